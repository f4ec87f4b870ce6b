"""lora.py: after a few training steps the merged model equals the LoRA model, loads with RWKV.from_pretrained and
in the `rwkv` package; only the trainable subset is saved; a LoRA checkpoint resumes; the layer filter holds; and
the same through train_pretrain.py (lora_r > 0), also under torchrun (DDP, FSDP2)."""
import pytest
import torch

from helpers import random_model, rel_err
from lora import LoraLinear, add_lora, load_lora, lora_state_dict, merge_files, merged_state_dict, save_lora
from model import RWKV

V = 300


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A random base model in an official fp32 file, LoRA'd on every part and layer, trained for 4 AdamW steps."""
    d = tmp_path_factory.mktemp("lora")
    random_model(seed=1, n_layer=2, n_embd=128, vocab_size=V).save_pretrained(d / "base.pth", dtype=torch.float32)
    model = add_lora(RWKV.from_pretrained(d / "base.pth"), r=4, alpha=8, dropout=0.1)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, V, (2, 48), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(4):
        loss = model(idx[:, :-1], idx[:, 1:])[1]
        loss.backward()
        opt.step(), opt.zero_grad()
    model.eval()
    save_lora(model, str(d / "lora.pth"))
    merge_files(str(d / "base.pth"), str(d / "lora.pth"), str(d / "merged.pth"), dtype=torch.float32)
    with torch.no_grad():
        logits = model(idx)[0]
    return d, model, idx, logits


def test_merged_equals_unmerged(trained):
    d, model, idx, logits = trained
    merged = RWKV.from_pretrained(d / "merged.pth").eval()
    base = RWKV.from_pretrained(d / "base.pth").eval()
    with torch.no_grad():
        merged_logits, base_logits = merged(idx)[0], base(idx)[0]
    assert rel_err(merged_logits, logits) <= 1e-4
    assert rel_err(base_logits, logits) > 1e-2  # the LoRA did change the model: the test above can fail
    lin = model.blocks[1].att.key
    assert isinstance(lin, LoraLinear) and lin.lora_B.abs().max() > 0
    assert merged_state_dict(model, torch.float32).keys() == base.state_dict().keys()  # official layout, no lora_*


def test_merged_loads_in_rwkv_package(trained, monkeypatch):
    monkeypatch.setenv("RWKV_V7_ON", "1")
    monkeypatch.setenv("RWKV_JIT_ON", "1")
    monkeypatch.setenv("RWKV_CUDA_ON", "0")
    from rwkv.model import RWKV as ReferenceRWKV  # reads the variables above at import time
    d, _, idx, logits = trained
    ref = ReferenceRWKV(str(d / "merged.pth")[:-4], "cpu fp32")
    state, ref_logits = None, []
    for t in idx[0].tolist():
        out, state = ref.forward([t], state)
        ref_logits.append(out)
    assert rel_err(logits[0], torch.stack(ref_logits)) <= 1e-4


def test_only_the_trainable_subset_is_saved(trained):
    d, model, _, _ = trained
    saved = torch.load(d / "lora.pth", weights_only=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert saved["weights"].keys() == trainable
    assert saved["lora_config"] == dict(r=4, alpha=8, dropout=0.1, parts="att,ffn,time,ln", layers="")
    assert not any(k.startswith(("emb.", "head.", "ln_out.")) or k.endswith(("key.weight", "value.weight"))
                   for k in saved["weights"])
    assert {"blocks.0.att.key.lora_A", "blocks.1.ffn.value.lora_B", "blocks.1.att.x_r", "blocks.1.ln1.weight",
            "blocks.0.att.ln_x.bias", "blocks.0.ffn.x_k"} <= saved["weights"].keys()
    n_saved = sum(t.numel() for t in saved["weights"].values())
    assert n_saved < 0.5 * sum(p.numel() for p in model.parameters())


def test_resume_from_lora_checkpoint(trained):
    d, model, idx, logits = trained
    resumed = load_lora(RWKV.from_pretrained(d / "base.pth"), str(d / "lora.pth")).eval()
    with torch.no_grad():
        assert torch.equal(resumed(idx)[0], logits)
    # and it keeps training: one more step moves only the trainable tensors
    resumed.train()
    before = {n: p.detach().clone() for n, p in resumed.named_parameters()}
    opt = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-2)
    resumed(idx[:, :-1], idx[:, 1:])[1].backward()
    opt.step()
    for n, p in resumed.named_parameters():
        assert torch.equal(p, before[n]) != p.requires_grad, n
    with pytest.raises(ValueError, match="does not match"):  # a checkpoint for another layer set
        ckpt = torch.load(d / "lora.pth", weights_only=True)
        ckpt["weights"].pop("blocks.0.att.key.lora_A")
        load_lora(RWKV.from_pretrained(d / "base.pth"), ckpt)


def test_parts_and_layer_filter():
    model = add_lora(random_model(n_layer=4, n_embd=64, vocab_size=50), r=2, alpha=2, parts="att", layers="1-2")
    names = set(lora_state_dict(model))
    assert names == {f"blocks.{i}.att.{m}.lora_{ab}" for i in (1, 2) for m in ("receptance", "key", "value", "output")
                     for ab in "AB"}
    assert not isinstance(model.blocks[0].att.key, LoraLinear) and not isinstance(model.blocks[1].ffn.key, LoraLinear)
    with pytest.raises(ValueError, match="out of range"):
        add_lora(random_model(n_layer=2, n_embd=64, vocab_size=50), r=2, alpha=2, layers="0-5")


# --- train_pretrain.py with lora_r > 0 ---------------------------------------------------------------------------

def test_trainer_lora_resume_and_merge(shakespeare, tmp_path):
    """LoRA fine-tuning of a .pth in the trainer: ckpt.pt and lora-latest.pth hold only the trainable subset, a run
    stopped at step 2 and resumed equals the uninterrupted one, and rwkv-final.pth is the merged model."""
    from test_pretrain import TINY, epoch_lines, train
    base = tmp_path / "base.pth"
    random_model(seed=2, n_layer=2, n_embd=64, vocab_size=65).save_pretrained(base, dtype=torch.float32)
    common = [f"--data_dir={shakespeare}", *TINY, "--max_iters=4", "--eval_interval=100"]
    lora = [f"--init_from={base}", "--lora_r=4", "--lora_alpha=8", "--lora_dropout=0.05", "--lora_layers=1"]
    train(f"--out_dir={tmp_path / 'ref'}", *common, *lora)
    train(f"--out_dir={tmp_path / 'cut'}", *common, *lora, "--exit_step=2")
    second = train(f"--out_dir={tmp_path / 'cut'}", *common, "--init_from=resume")  # LoRA settings from ckpt.pt
    assert "resumed from" in second.stdout
    ref = epoch_lines(tmp_path / "ref")
    assert len(ref) == 4 and epoch_lines(tmp_path / "cut") == ref
    ck = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=False)
    assert ck["model"] and all(k.startswith("blocks.1.") for k in ck["model"])  # only the trainable subset
    saved = torch.load(tmp_path / "cut" / "lora-latest.pth", weights_only=True)
    assert saved["weights"].keys() == ck["model"].keys() and "blocks.1.att.key.lora_B" in saved["weights"]
    merged = RWKV.from_pretrained(tmp_path / "cut" / "rwkv-final.pth").eval()
    model = load_lora(RWKV.from_pretrained(base), str(tmp_path / "cut" / "lora-latest.pth")).eval()
    idx = torch.randint(0, 65, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # rwkv-final.pth is bf16, like every official file: compare at bf16 precision
        assert rel_err(merged(idx)[0], model(idx)[0]) <= 2e-2
        assert rel_err(model(idx)[0], RWKV.from_pretrained(base).eval()(idx)[0]) > 1e-3  # LoRA changed it


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_trainer_lora_under_torchrun(shakespeare, tmp_path, parallel):
    """LoRA with 2 processes x batch 4 (gloo) = 1 process x batch 8 over 5 steps: the same losses (<= 1e-5), the same
    trainable tensors and Adam moments (<= 1e-5), the same merged rwkv-final.pth. DDP runs with state_cp too (its
    hand-made gradient average over the trainable subset); FSDP2 stops at step 2 and resumes: ckpt.pt holds the
    gathered trainable subset, unsharded, and the resumed run continues exactly. No dropout: its masks depend on
    how the batch is split."""
    from test_pretrain import TINY, TORCHRUN, assert_same_state, ckpt, epoch_lines, train
    base = tmp_path / "base.pth"
    random_model(seed=2, n_layer=2, n_embd=64, vocab_size=65).save_pretrained(base, dtype=torch.float32)
    common = [f"--data_dir={shakespeare}", *TINY, "--max_iters=5", "--eval_interval=100", f"--init_from={base}",
              "--lora_r=4", "--lora_alpha=8", "--lora_layers=1"]
    train(f"--out_dir={tmp_path / 'one'}", *common)
    run = [f"--out_dir={tmp_path / 'two'}", *common, "--batch_size=4", f"--parallel={parallel}"]
    if parallel == "ddp":
        train(*run, "--state_cp=True", "--ctx_parts=3", launcher=TORCHRUN)
    else:
        train(*run, "--exit_step=2", launcher=TORCHRUN)
        cut = ckpt(tmp_path / "two")
        assert cut["step"] == 2 and cut["model"] and all(k.startswith("blocks.1.") for k in cut["model"])
        assert all(type(v) is torch.Tensor for v in cut["model"].values())  # gathered, not DTensor shards
        resumed = train(*run[:-2], "--init_from=resume", "--batch_size=4", f"--parallel={parallel}",
                        launcher=TORCHRUN)
        assert "resumed from" in resumed.stdout
    ours, ref = epoch_lines(tmp_path / "two"), epoch_lines(tmp_path / "one")
    assert [(e, lr) for e, _, lr in ours] == [(e, lr) for e, _, lr in ref] and len(ref) == 5
    assert max(abs(float(a) - float(b)) for (_, a, _), (_, b, _) in zip(ours, ref)) <= 1e-5, (ours, ref)
    a, b = ckpt(tmp_path / "two"), ckpt(tmp_path / "one")
    trainable = set(torch.load(tmp_path / "one" / "lora-latest.pth", weights_only=True)["weights"])
    assert set(a["model"]) == trainable and "blocks.1.att.key.lora_B" in trainable
    assert_same_state(a, b, atol=1e-5)
    merged = [torch.load(tmp_path / d / "rwkv-final.pth", weights_only=True) for d in ("one", "two")]
    assert merged[0].keys() == merged[1].keys() and all(rel_err(merged[1][k], merged[0][k]) <= 8e-3 for k in merged[0])
