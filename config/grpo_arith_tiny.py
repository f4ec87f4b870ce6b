# The CPU demo: GRPO on 1-2 digit addition ('12+34=' -> '46\n') for a tiny character-level RWKV-7 that was first
# trained supervised to a low accuracy (data/grpo/sft.py). Measured numbers: README, section GRPO.
#   python data/grpo/prepare.py --task=arith --digits=1,2 --ops=+ --out=data/grpo/arith12
#   python data/grpo/sft.py --prompts=data/grpo/arith12/train.jsonl --out_dir=out-arith-sft --steps=450
#   OMP_NUM_THREADS=1 python train_grpo.py config/grpo_arith_tiny.py
out_dir = 'out-grpo-arith'
init_from = 'out-arith-sft'
train_prompts = 'data/grpo/arith12/train.jsonl'
eval_prompts = 'data/grpo/arith12/test.jsonl'
prompt_format = 'raw'
rewards = 'arith'
stop = ['\n']
max_new_tokens = 5  # the answer has at most 3 digits, then the newline
prompts_per_step = 32
group_size = 8
temperature = 1.0
mu = 2  # two optimizer steps per rollout batch (the second one against the sampling policy's log-probs)
learning_rate = 5e-4  # a tiny model takes a large lr
max_steps = 150
eval_interval = 50
save_interval = 150
log_interval = 10
