# a small GPT on Shakespeare with the GPT-2 BPE tokenizer (data/shakespeare)

out_dir = 'out-shakespeare'
eval_interval = 250
eval_iters = 100
log_interval = 10
always_save_checkpoint = False

dataset = 'shakespeare'
gradient_accumulation_steps = 1
batch_size = 16
block_size = 256

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 6e-4
max_iters = 5000
lr_decay_iters = 5000
min_lr = 6e-5
beta2 = 0.99
warmup_iters = 100
