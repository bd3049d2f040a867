# tiny_cls on MNIST idx files: the tiny_cls recipe (4 x 64, Muon, 0.1 x next-code loss) on 28x28
# digits read as 49 codes: k-means over 4x4 pixel patches (256 codes, fit on the train split),
# 7x7 patches per image; 2 shifted copies (up to 2 pixels) of each train image.
# python prepare/tiny_cls.py --mnist_dir ../shared/data/mnist
# python train.py config/tiny_cls_mnist.py
# python sample.py --out_dir=weight/tiny_cls_mnist --classify
dataset = "tiny_cls_mnist"
out_dir = "weight/tiny_cls_mnist"
device = "cpu"
block_size = 53  # <IMG> + 49 codes + </IMG> <CLS> <CLS_k> <EOS> = 54 tokens; x and y are 53 long
batch_size = 64
n_layer = 4
n_head = 4
n_embd = 64
dropout = 0.0
prompt_loss_weight = 0.1
optimizer = "muon"
muon_lr = 0.02
learning_rate = 3e-3
max_iters = 2000
lr_decay_iters = 0  # = max_iters, also when --max_iters overrides it
min_lr = 3e-5
warmup_iters = 50
beta2 = 0.99
weight_decay = 0.1
eval_interval = 500
eval_iters = 4
log_interval = 100
always_save_checkpoint = True
