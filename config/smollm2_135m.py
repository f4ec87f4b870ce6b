# SmolLM2-135M-Instruct (Llama: 30 layers, d 576, 9 heads / 3 KV heads, head 64, tied embeddings) -> a hybrid whose
# 30 attention layers are all RWKV-7. One file for the three stages: put --stage before the config file.
#   python data/distill/prepare.py                                   # chat data -> data/distill/train.jsonl
#   python train_distill.py config/smollm2_135m.py                   # stage 1: align
#   python train_distill.py --stage=2 config/smollm2_135m.py         # stage 2: KL against the teacher
#   python train_distill.py --stage=3 config/smollm2_135m.py         # stage 3: SFT (optional)
# Offline, the teacher can be the GGUF file: --base=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf (needs gguf).
# For a hybrid that keeps every fourth attention layer: --rwkv_layers="[i for i in range(30) if i % 4 != 3]" does
# not parse as a literal; use the list, e.g. --rwkv_layers=[0,1,2,4,5,6,8,9,10,12,13,14,16,17,18,20,21,22,24,25,26,28,29]
base = 'HuggingFaceTB/SmolLM2-135M-Instruct'
data = 'data/distill/train.jsonl'
out_dir = f'out-smollm2/stage{stage}'
init_from = 'teacher' if stage == 1 else f'out-smollm2/stage{stage - 1}/hybrid'
ctx_len = 512
batch_size = 16
eval_interval = 100
save_interval = 200
if stage == 1:  # ~16M tokens: RADLADS' step 1 at lr 1e-3 -> 1e-5, scaled down with the model
    max_steps, learning_rate, lr_final, warmup_steps = 2000, 1e-3, 1e-5, 50
elif stage == 2:  # ~33M tokens at a flat-ish low lr, everything trains, embeddings untied
    max_steps, learning_rate, lr_final, warmup_steps = 4000, 1e-4, 1e-5, 50
else:
    max_steps, learning_rate, lr_final, warmup_steps = 1000, 1e-5, 1e-5, 10
