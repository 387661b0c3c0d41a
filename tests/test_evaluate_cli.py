"""`factlab evaluate MODEL --world W`: any saved model (HF, wrapper) on a world's questions;
predictions written recompute the accuracy; bad input is one error and exit 2."""

import json

import torch

from factlab.corpus.store import save_world
from factlab.evaluate.metrics import metrics_from_predictions
from factlab.model.build import build_model
from factlab.model.wrapper import FrozenBackbone
from factlab.tokens.tokenizer import world_tokenizer

from conftest import cli, make


class Bias(FrozenBackbone):
    """A wrapper that adds a learned vector to the last hidden states (zero: no effect)."""

    def __init__(self, backbone, **kw):
        super().__init__(backbone, **kw)
        self.bias = torch.nn.Parameter(torch.zeros(backbone.config.hidden_size))
        self.add_hook(backbone.get_output_embeddings(), lambda m, a, o: None)


def test_evaluate_any_saved_model(tmp_path, capfd):
    world = make(people=20, seed=2, unknown=0)
    save_world(world, tmp_path / "world")
    tok = world_tokenizer(world, 400)
    model = build_model("gpt2-rope", "tiny", len(tok), 128, bos_id=tok.bos_token_id,
                        eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=0)
    model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    out = tmp_path / "preds"
    capfd.readouterr()
    assert cli("evaluate", tmp_path / "hf", "--world", tmp_path / "world", "--split", "all",
               "--out", out) == 0
    # one progress display: Hugging Face's "Loading weights" bar is not interleaved, in
    # this process or in a worker it spawns (which inherits the environment)
    assert "Loading weights" not in capfd.readouterr().err
    import os
    import subprocess
    import sys

    child = subprocess.run([sys.executable, "-c", "import sys; from transformers import "
                            "AutoModelForCausalLM as M; M.from_pretrained(sys.argv[1])"
                            ".save_pretrained(sys.argv[2])",  # a load and a save
                            str(tmp_path / "hf"), str(tmp_path / "resaved")],
                           env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert child.returncode == 0 and (tmp_path / "resaved" / "config.json").is_file()
    assert "Loading weights" not in child.stderr and "Writing model shards" not in \
        child.stderr, child.stderr
    recs = {s: [json.loads(x) for x in open(out / f"predictions_{s}.jsonl")]
            for s in ("id", "ood", "paraphrase")}
    assert len(recs["id"]) == 6 * len(world.train_ids) and len(recs["ood"]) == 6 * len(world.test_ids)
    assert metrics_from_predictions(recs["ood"])["exact_match"] == sum(
        r["correct"] for r in recs["ood"]) / len(recs["ood"])
    # a wrapper directory: its tokenizer is found through the backbone it names
    from factlab.model.load import load_any

    Bias(load_any(tmp_path / "hf")).save_pretrained(tmp_path / "wrapped")
    assert cli("evaluate", tmp_path / "wrapped", "--world", tmp_path / "world", "--out",
               tmp_path / "p2", "--people", "3") == 0
    wrapped = [json.loads(x) for x in open(tmp_path / "p2" / "predictions_ood.jsonl")]
    assert [r["prediction"] for r in wrapped] == [r["prediction"] for r in recs["ood"][:18]]
    # bad input: exit 2, nothing written
    assert cli("evaluate", tmp_path / "nope", "--world", tmp_path / "world") == 2
    assert cli("evaluate", tmp_path / "hf", "--world", tmp_path / "world", "--split", "x",
               "--out", tmp_path / "p3") == 2
    assert not (tmp_path / "p3").exists()
