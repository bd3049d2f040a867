# tiny_cls on your own images: the MNIST recipe (4 x 64, Muon, 0.1 x next-code loss) on a
# folder of class folders, read at 28x28 as 49 k-means codes (prepare/tiny_cls.py's defaults).
# python prepare/tiny_cls.py --image_dir DIR            # DIR/train/<class>/*, DIR/val/<class>/*
# python train.py config/tiny_cls_images.py
# python sample.py --out_dir=weight/tiny_cls_images --classify --image=PATH_OR_FOLDER
dataset = "tiny_cls_images"
out_dir = "weight/tiny_cls_images"
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
