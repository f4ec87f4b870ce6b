# GPU: GRPO on 2-3 digit addition for SmolLM2-135M-Instruct (as a plain transformer policy) or a distilled
# SmolLM2 hybrid (init_from=out-smollm2/stage2/hybrid). Issue 8's acceptance: >= 20 points of held-out accuracy in
# <= 20 minutes. H200, 2026-12-03: 7.5% -> 51.5% greedy on 200 held-out problems after 50 steps (5.5 minutes,
# sharing the GPU with three other runs); the README has the sweep and before/after completions.
#   python data/grpo/prepare.py --task=arith --digits=2,3 --ops=+ --style=question --out=data/grpo/add23
#   python train_grpo.py config/grpo_arith_smollm2.py --init_from=$RWKV7_DATA_DIR/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
out_dir = 'out-grpo-arith-smollm2'
init_from = ''  # a hybrid directory, or the SmolLM2 GGUF / hub id / directory
train_prompts = 'data/grpo/add23/train.jsonl'
eval_prompts = 'data/grpo/add23/test.jsonl'
eval_max_prompts = 200
prompt_format = 'chat'
rewards = 'gsm8k:1.0'  # the number after '####', else the last number ('83 + 13 = 96')
eval_reward = 'gsm8k'
stop = []  # the chat template's end-of-turn token ends a completion
max_new_tokens = 64  # answers are one line; rambling ones are cut
prompts_per_step = 32
group_size = 8
temperature = 0.7  # at 1.0 the 135M model rambles: longer rollouts, same accuracy at step 50
loss_type = 'token'
eps_low, eps_high = 0.2, 0.28
beta = 0.0
learning_rate = 1e-5
warmup_steps = 5
max_steps = 100
eval_interval = 25
save_interval = 50
log_interval = 1
micro_batch = 64
