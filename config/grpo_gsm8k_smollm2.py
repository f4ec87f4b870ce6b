# GPU: GRPO on GSM8K for SmolLM2-135M-Instruct or a distilled SmolLM2 hybrid (init_from=out-smollm2/stage2/hybrid).
#   python data/grpo/prepare.py --task=gsm8k --gsm8k_dir=$RWKV7_DATA_DIR/gsm8k --out=data/grpo/gsm8k
#   torchrun --standalone --nproc_per_node=8 train_grpo.py config/grpo_gsm8k_smollm2.py --init_from=...
out_dir = 'out-grpo-gsm8k-smollm2'
init_from = ''  # a hybrid directory, or the SmolLM2 GGUF / hub id / directory
train_prompts = 'data/grpo/gsm8k/train.jsonl'
eval_prompts = 'data/grpo/gsm8k/test.jsonl'
eval_max_prompts = 300
prompt_format = 'chat'
rewards = 'gsm8k:1.0,format:0.2'
eval_reward = 'gsm8k'
stop = []
max_new_tokens = 512  # GSM8K chains of thought: 256 truncates most of them (TRL #6263)
mask_truncated = True  # DAPO's overlong filtering
dynamic_sampling = True  # groups with one reward for all G carry no signal
prompts_per_step = 32
group_size = 8
temperature = 1.0
loss_type = 'token'
eps_low, eps_high = 0.2, 0.28
beta = 0.0
learning_rate = 2e-6
warmup_steps = 10
max_steps = 500
eval_interval = 50
save_interval = 50
micro_batch = 16
