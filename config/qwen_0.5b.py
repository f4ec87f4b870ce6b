# Qwen2.5-0.5B-Instruct (24 layers, d 896, 14 heads / 2 KV heads, head 64, q/k/v biases, tied embeddings) -> an
# all-RWKV-7 hybrid, with RADLADS' three stages scaled to 0.5B. One file for all stages: put --stage before it.
#   torchrun --standalone --nproc_per_node=8 train_distill.py config/qwen_0.5b.py                          # stage 1
#   torchrun --standalone --nproc_per_node=8 train_distill.py --stage=2 config/qwen_0.5b.py --teacher_ranks=2
#   torchrun --standalone --nproc_per_node=8 train_distill.py --stage=3 config/qwen_0.5b.py
# Token budgets assume 8 trainer ranks (stage 2 with 2 teacher ranks: 6 trainers, so 25% fewer tokens per step).
base = 'Qwen/Qwen2.5-0.5B-Instruct'
data = 'data/distill/train.jsonl'  # python data/distill/prepare.py (UltraChat-200k and C4 need a network)
out_dir = f'out-qwen0.5b/stage{stage}'
init_from = 'teacher' if stage == 1 else f'out-qwen0.5b/stage{stage - 1}/hybrid'
ctx_len = 512
batch_size = 8  # per trainer rank: 64 x 512 = 32k tokens per step on 8 ranks
eval_interval = 250
save_interval = 500
grad_checkpointing = stage > 1
if stage == 1:  # 50M tokens, lr 1e-3 -> 1e-5 (RADLADS step 1: 100M tokens for 7B)
    max_steps, learning_rate, lr_final, warmup_steps = 1500, 1e-3, 1e-5, 50
elif stage == 2:  # 200M tokens, lr 1e-5 flat (RADLADS step 2: 250-700M tokens for 7B)
    max_steps, learning_rate, lr_final, warmup_steps = 6000, 1e-5, 1e-5, 50
else:  # SFT on assistant tokens, 20M tokens
    max_steps, learning_rate, lr_final, warmup_steps = 600, 1e-5, 1e-5, 10
