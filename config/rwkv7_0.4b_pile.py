# RWKV-7 0.4B (L24-D1024, GPT-NeoX 20B tokenizer, vocab 50304) on the Pile, as the authors trained
# BlinkDL/rwkv-7-pile (HF card; run script RWKV-LM RWKV-v7/train_temp/demo-training-run-v7-pile.sh).
# Data: the Pile as one binidx prefix tokenized with the 20B tokenizer (332,115,325,534 tokens), e.g.
#   python data/prepare.py --tokenizer=hf:EleutherAI/gpt-neox-20b --out=data/pile pile/*.jsonl   (a dir with val)
# or the authors' pile_20B_tokenizer_text_document prefix (no val split). Then, on 8 GPUs:
#   torchrun --standalone --nproc_per_node=8 train_pretrain.py config/rwkv7_0.4b_pile.py
# 8 x 30 x 4096 = 983,040 tokens/step; 337,846 steps; 168 steps = 1 mini-epoch of 40320 samples.
# magic_prime 81082817 fits the authors' file at ctx 4096; for other data set magic_prime = 0 (derived).
out_dir = 'out-rwkv7-0.4b-pile'
data_dir = 'data/pile/pile_20B_tokenizer_text_document'
vocab_size = 50304
eval_interval = 1000
log_interval = 10
epoch_save = 50

n_layer = 24
n_embd = 1024
head_size = 64
ctx_len = 4096
batch_size = 30  # per GPU (80 GB)
magic_prime = 81082817
epoch_samples = 40320
max_tokens = 332115325534

learning_rate = 6e-4
min_lr = 2e-5
warmup_iters = 10
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.99
adam_eps = 1e-18
grad_clip = 1.0
grad_checkpointing = True  # as the authors (grad_cp 1): ctx 4096 x 30 samples of activations per GPU
