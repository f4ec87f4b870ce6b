# RWKV-7 1.5B (L24-D2048, GPT-NeoX 20B tokenizer, vocab 50304) on the Pile, as the authors trained
# BlinkDL/rwkv-7-pile (HF card). Data as in config/rwkv7_0.4b_pile.py. On 8 GPUs, sharded:
#   torchrun --standalone --nproc_per_node=8 train_pretrain.py config/rwkv7_1.5b_pile.py
# 8 x 45 x 4096 = 1,474,560 tokens/step; 225,231 steps; 112 steps = 1 mini-epoch of 40320 samples.
# 1.47B parameters: fp32 weights + AdamW = 23.5 GB per GPU under DDP, ~3 GB under FSDP (hence parallel='fsdp').
out_dir = 'out-rwkv7-1.5b-pile'
data_dir = 'data/pile/pile_20B_tokenizer_text_document'
vocab_size = 50304
eval_interval = 1000
log_interval = 10
epoch_save = 50
parallel = 'fsdp'

n_layer = 24
n_embd = 2048
head_size = 64
ctx_len = 4096
batch_size = 45  # per GPU (80 GB)
magic_prime = 81082817
epoch_samples = 40320
max_tokens = 332115325534

learning_rate = 5e-4
min_lr = 1.5e-5
warmup_iters = 10
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.99
adam_eps = 1e-18
grad_clip = 1.0
grad_checkpointing = True
