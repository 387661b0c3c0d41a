"""The frozen-backbone wrapper and the one loader (issue 12 §3): a toy method that adds
a trainable shift to one layer's output. Zero-init equals the backbone; training moves
only the shift; the backbone is bit-identical, in eval mode and untouched when called
directly; checkpoints and exports hold the shift only; load_any opens HF, peft-adapter
and wrapper directories; the batched evaluator runs on the wrapper."""

import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from factlab.errors import FactlabError
from factlab.model.build import build_model
from factlab.model.load import load_any, model_kind
from factlab.model.wrapper import FrozenBackbone
from factlab.train import Loop, LoRA, Plugin, TrainConfig

sys.path.insert(0, str(Path(__file__).parent))
from ddp_train import Toy  # noqa: E402


class Shift(FrozenBackbone):
    """Adds a learned vector to the output of backbone layer ``layer``."""

    def __init__(self, backbone, layer: int = 1, **kw):
        super().__init__(backbone, **kw)
        self.layer = layer
        self.shift = torch.nn.Parameter(torch.zeros(backbone.config.hidden_size))
        self.seen_training = []
        self.add_hook(backbone.gpt_neox.layers[layer], self._add)

    def _add(self, module, args, output):
        self.seen_training.append(module.training)
        if isinstance(output, tuple):
            return (output[0] + self.shift,) + tuple(output[1:])
        return output + self.shift

    def wrapper_config(self):
        return {"layer": self.layer}


def backbone(tmp_path=None, seed=0):
    m = build_model("gpt2-rope", "tiny", 64, 32, bos_id=0, eos_id=0, pad_id=1, seed=seed)
    if tmp_path is not None:  # a saved backbone, so the wrapper can name its path
        m.save_pretrained(tmp_path / f"backbone{seed}")
        m = load_any(tmp_path / f"backbone{seed}")
    return m


def cfg(**kw):
    return TrainConfig(**{**dict(steps=10, batch_size=4, lr=1e-2, log_every=5, precision="no",
                                 ckpt_minutes=0), **kw})


def test_zero_init_equals_backbone_and_training_moves_only_the_shift(tmp_path):
    bb = backbone(tmp_path)
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    w = Shift(bb)
    x = torch.randint(2, 64, (2, 12))
    assert torch.equal(w(input_ids=x).logits, bb(input_ids=x).logits)
    assert [n for n, _ in w.named_parameters()] == ["shift"]
    loop = Loop(w, Toy(), cfg(), tmp_path / "run", progress=False)
    loop.run()
    assert w.shift.abs().sum() > 0
    assert all(torch.equal(v, before[k]) for k, v in bb.state_dict().items())
    assert w.seen_training and not any(w.seen_training)  # backbone in eval mode throughout
    assert not bb.training
    # the hook acts only inside the wrapper: the backbone called directly is untouched
    assert not torch.equal(w(input_ids=x).logits, bb(input_ids=x).logits)
    assert torch.equal(bb(input_ids=x).logits, backbone()(input_ids=x).logits)
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "run" / "checkpoint" / "model.safetensors")) == {"shift"}
    # the export is a wrapper directory; load_any rebuilds it on the named backbone
    assert model_kind(tmp_path / "run" / "model") == "wrapper"
    assert set(load_file(tmp_path / "run" / "model" / "wrapper.safetensors")) == {"shift"}
    again = load_any(tmp_path / "run" / "model")
    assert isinstance(again, Shift) and again.layer == 1
    assert torch.equal(again(input_ids=x).logits, w(input_ids=x).logits)
    with pytest.raises(FactlabError, match="not the one this wrapper was trained on"):
        load_any(tmp_path / "run" / "model", backbone=backbone(seed=1))


def test_resume_of_a_wrapper_run_refuses_another_backbone(tmp_path):
    class Boom(Plugin):
        name = "boom"

        def after_step(self, loop, step, logs):
            if step == 6:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Loop(Shift(backbone()), Toy(), cfg(ckpt_every=3), tmp_path, plugins=[Boom()],
             progress=False).run()
    with pytest.raises(FactlabError, match="other frozen weights"):
        Loop(Shift(backbone(seed=1)), Toy(), cfg(ckpt_every=3), tmp_path,
             progress=False).run()
    Loop(Shift(backbone()), Toy(), cfg(ckpt_every=3), tmp_path, progress=False).run()


def test_load_any_opens_hf_and_adapter_directories_and_rejects_others(tmp_path):
    bb = backbone(tmp_path)
    loop = Loop(bb, Toy(), cfg(steps=4), tmp_path / "lora", plugins=[LoRA(4, 8, export="adapter")],
                progress=False)
    loop.run()
    assert model_kind(tmp_path / "lora" / "model") == "adapter"
    x = torch.randint(2, 64, (2, 12))
    loaded = load_any(tmp_path / "lora" / "model")
    assert torch.allclose(loaded(input_ids=x).logits, loop.model(input_ids=x).logits, atol=1e-6)
    assert model_kind(tmp_path / "backbone0") == "hf"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FactlabError, match="holds no model"):
        load_any(tmp_path / "empty")
    with pytest.raises(FactlabError, match="does not exist"):
        load_any(tmp_path / "nope")
    bad = tmp_path / "evil"
    bad.mkdir()
    (bad / "factlab_wrapper.json").write_text('{"class": "os:system"}')
    with pytest.raises(FactlabError, match="not a factlab class"):
        load_any(bad)


def test_the_batched_evaluator_runs_on_a_wrapper():
    from factlab.evaluate.generate import evaluate_qa

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = ["What is the city of Ann?\nAnswer: Paris", "What is the city of Bo?\nAnswer: Rome"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>", "<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    bb = build_model("gpt2-rope", "tiny", len(t), 64, bos_id=0, eos_id=0, pad_id=1, seed=0)
    w = Shift(bb)
    with torch.no_grad():
        w.shift.normal_()

    class QA:
        question = ["What is the city of Ann?", "What is the city of Bo?"]
        answer = ["Paris", "Rome"]
        attribute = [0, 0]
        person = [0, 1]
        attributes = ("city",)

    m_w, rec_w = evaluate_qa(w, t, QA(), batch_size=2)
    m_b, rec_b = evaluate_qa(bb, t, QA(), batch_size=2)
    assert len(rec_w) == 2 and "exact_match" in m_w
    # the shift acts during generation: the wrapper's completions are its own
    assert [r["prediction"] for r in rec_w] != [r["prediction"] for r in rec_b]


def test_the_model_layer_imports_nothing_from_train():
    """Data flows one way: no module of factlab.model (wrapper, loader, fingerprint)
    imports factlab.train, not even inside a function."""
    import ast

    root = Path(__file__).parents[1] / "factlab" / "model"
    found = []
    for f in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            found += [f"{f.name}: {n}" for n in names
                      if n.startswith(("factlab.train", "factlab.evaluate", "factlab.memory",
                                       "factlab.experiments", "factlab.probe"))]
    assert found == []
