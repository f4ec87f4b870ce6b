# RWKV-7 0.1B (L12-D768, World vocab) on MiniPile: the authors' demo (RWKV-LM RWKV-v7/train_temp/demo-training-run.sh).
# Data: the published binidx files (World tokenizer, uint16, 1,498,226,207 tokens; ~3 GB, no val split):
#   mkdir -p data/minipile && for f in idx bin; do wget -c -O data/minipile/minipile.$f \
#     https://huggingface.co/datasets/BlinkDL/minipile-tokenized/resolve/main/rwkv_vocab_v20230424/minipile.$f; done
#   python train_pretrain.py config/rwkv7_0.1b_minipile.py                                   # 1 GPU
#   torchrun --standalone --nproc_per_node=4 train_pretrain.py config/rwkv7_0.1b_minipile.py --batch_size=4
# 16 x 512 = 8,192 tokens/step; 182,889 steps; 2,520 steps = 1 mini-epoch (40320 samples) = 1 train_log.txt line,
# 72.6 in all. The authors' curve (train_log.txt, within +-0.01, reference §3.7): mini-epoch 0 4.875856,
# 1 4.028621, 2 3.801625, 5 3.510906, 11 3.295895. It predates their 2025-05 init change: expect small deviations.
out_dir = 'out-rwkv7-0.1b-minipile'
data_dir = 'data/minipile/minipile'  # a bare binidx prefix: vocab_size must be given, and there is no validation
vocab_size = 65536
eval_interval = 2520  # no val split: this is the checkpoint interval (ckpt.pt + rwkv-latest.pth)
log_interval = 100
epoch_save = 10  # rwkv-0.pth, rwkv-10.pth, ... as the authors keep them

n_layer = 12
n_embd = 768
head_size = 64
ctx_len = 512
batch_size = 16
magic_prime = 2926181  # the largest 3n+2 prime below 1498226207 / 512 - 1
epoch_samples = 40320
max_tokens = 1498226207

learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 10
weight_decay = 0.001
beta1 = 0.9
beta2 = 0.99
adam_eps = 1e-18
grad_clip = 1.0
grad_checkpointing = False  # the authors use grad_cp 1 to save memory; at 0.1B an H100 does not need it
