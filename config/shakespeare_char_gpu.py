# Character-level RWKV-7 on tiny Shakespeare at nanoGPT's GPU budget (its config/train_shakespeare_char.py:
# 6 layers x 384 wide, ctx 256, batch 64, 5000 steps; its baby GPT has 10.65M parameters, best val loss 1.4697).
#   python data/shakespeare_char/prepare.py && python train_pretrain.py config/shakespeare_char_gpu.py
# RWKV-7 L6-D384 is 11.87M parameters (L8-D320 would be 10.88M). 64 x 256 = 16,384 tokens/step. RWKV-7 fits the
# 1.0M train chars much faster than nanoGPT's GPT and then overfits: with nanoGPT's lr 1e-3 and 5,000 steps, val loss
# was best at step 500 (1.527) whatever the dropout (0.2-0.4) or weight decay (0.1-2.0). What worked (H200,
# 2026-12-03, README): a much higher lr and a short cosine that ends where overfitting starts: 1.4646 at step 500
# (seeds 1, 2, 3: 1.4618, 1.4725, 1.4675).
# The best val loss is printed at the end; ckpt.pt holds the last step, not the best.
out_dir = 'out-shakespeare-char-gpu'
data_dir = 'data/shakespeare_char'
eval_interval = 100
eval_iters = 50
log_interval = 50
epoch_samples = 16000  # a "mini-epoch" of 250 steps
epoch_save = 0

n_layer = 6
n_embd = 384  # 6 heads of 64
dropout = 0.3
ctx_len = 256
batch_size = 64
magic_prime = -1  # random windows: 3,900 aligned slots of 256 chars are few distinct samples for 8 passes

learning_rate = 6e-3  # six times nanoGPT's: 1e-3 gave 1.502 at best, 2e-3 1.478, 4e-3 1.472, 8e-3 1.464
min_lr = 1e-4
warmup_iters = 100
max_iters = 500  # within nanoGPT's 5,000; longer runs overfit (1,000 steps: best 1.512; 5,000: 1.527)
weight_decay = 0.1
