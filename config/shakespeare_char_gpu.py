# Character-level RWKV-7 on tiny Shakespeare at nanoGPT's GPU budget (its config/train_shakespeare_char.py:
# 6 layers x 384 wide, ctx 256, batch 64, 5000 steps; its baby GPT has 10.65M parameters, best val loss 1.4697).
#   python data/shakespeare_char/prepare.py && python train_pretrain.py config/shakespeare_char_gpu.py
# RWKV-7 L6-D384 is 11.87M parameters (L8-D320 would be 10.88M). 64 x 256 = 16,384 tokens/step; 5,000 steps =
# 82M tokens, ~80 passes over the 1.0M train chars. nanoGPT uses dropout 0.2 against that, and so does this
# config: without it (H200, 2026-12-03) val loss was best at step 250 (1.548) and reached 3.93 by step 5000. With
# it, still best at step 500 and rising after; the shorter cosine below gave the best of four runs, 1.512 (README).
# The best val loss is printed at the end; ckpt.pt holds the last step, not the best.
out_dir = 'out-shakespeare-char-gpu'
data_dir = 'data/shakespeare_char'
eval_interval = 250
eval_iters = 50
log_interval = 50
epoch_samples = 16000  # a "mini-epoch" of 250 steps
epoch_save = 0

n_layer = 6
n_embd = 384  # 6 heads of 64
dropout = 0.2
ctx_len = 256
batch_size = 64
magic_prime = -1  # random windows: 3,900 aligned slots of 256 chars are few distinct samples for 80 passes

learning_rate = 1e-3  # nanoGPT's for this size; untuned for RWKV-7
min_lr = 1e-4
warmup_iters = 100
max_iters = 1000  # nanoGPT's 5,000 overfit: best 1.527, then 2.94 by step 4,000
weight_decay = 0.1
