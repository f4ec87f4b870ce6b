"""
Loss curves of a train_pretrain.py run as a PNG, without wandb. Needs matplotlib (pip install matplotlib).

    python plot_log.py out-shakespeare-char            # writes out-shakespeare-char/loss.png
    python plot_log.py out-rwkv7-0.1b-minipile curve.png

Left: train loss at every log line and val loss at every evaluation (out_dir/log.txt). Right: the mean loss of
each mini-epoch (out_dir/train_log.txt, the authors' format), the curve their README quotes.
"""
import os, re, sys

def read_log(out_dir):
    """{step: loss} for train and val; a step logged twice (a rerun after a crash) keeps its last value."""
    with open(os.path.join(out_dir, 'log.txt')) as f:
        text = f.read()
    train = {int(s): float(v) for s, v in re.findall(r'^step (\d+)/\d+ \| loss (\S+)', text, re.M)}
    val = {int(s): float(v) for s, v in re.findall(r'^step (\d+) \| val loss (\S+)', text, re.M)}
    return train, val

def read_train_log(out_dir):
    """{mini-epoch: mean loss} from lines '{epoch} {loss} {ppl} {lr} {date} {time} {epoch in this run}'."""
    path = os.path.join(out_dir, 'train_log.txt')
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return {int(m[1]): float(m[2]) for m in re.finditer(r'^(\d+) (\S+) \S+ \S+ \S+ \S+ \d+$', f.read(), re.M)}

if __name__ == '__main__':
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    out_dir = sys.argv[1]
    png = sys.argv[2] if len(sys.argv) == 3 else os.path.join(out_dir, 'loss.png')
    try:
        import matplotlib
        matplotlib.use('Agg')  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot_log.py needs matplotlib: pip install matplotlib")
    train, val = read_log(out_dir)
    epochs = read_train_log(out_dir)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.plot(sorted(train), [train[s] for s in sorted(train)], lw=0.8, label='train')
    left.plot(sorted(val), [val[s] for s in sorted(val)], 'o-', label='val')
    left.set(xlabel='step', ylabel='loss', title=out_dir)
    left.legend()
    right.plot(sorted(epochs), [epochs[e] for e in sorted(epochs)], 'o-')
    right.set(xlabel='mini-epoch', ylabel='mean train loss', title='train_log.txt')
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    print(f"wrote {png}: {len(train)} train points, {len(val)} val points, {len(epochs)} mini-epochs")
