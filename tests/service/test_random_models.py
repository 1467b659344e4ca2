"""Random test models load through from_pretrained with working tokenizers; the CLI modules of the
service stay light to import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer
from typer.testing import CliRunner

from fedbpt_cli.main import COMMANDS
from inference_service.model_files import infer_head
from inference_service.random_models import build_random_model, make_random_model
from tests.service.conftest import Zoo


@pytest.mark.parametrize(
    ("arch", "head"), [("bert", "mlm"), ("roberta", "mlm"), ("llama", "causal"), ("st-bert", "embedding")]
)
def test_models_load_the_user_way(zoo: Zoo, arch: str, head: str) -> None:
    path = zoo.path(arch)
    assert infer_head(str(path)) == head
    tok = AutoTokenizer.from_pretrained(str(path))
    text = "it was a great movie"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True).strip().lower() == text
    config = AutoConfig.from_pretrained(str(path))
    assert config.vocab_size == len(tok)
    assert (
        json.loads((path / "tokenizer_config.json").read_text())["tokenizer_class"]
        == "PreTrainedTokenizerFast"
    )
    if arch == "llama":
        assert ids[0] == tok.bos_token_id and ids[-1] != tok.eos_token_id
        assert config.hidden_size // config.num_attention_heads == 64  # vLLM's CPU attention needs it
        model = AutoModelForCausalLM.from_pretrained(str(path))
        assert model(input_ids=torch.tensor([ids])).logits.shape == (1, len(ids), len(tok))
    elif arch in ("bert", "roberta"):
        assert (ids[0], ids[-1]) == (tok.cls_token_id, tok.sep_token_id) and tok.mask_token_id is not None
        model = AutoModelForMaskedLM.from_pretrained(str(path))
        assert model(input_ids=torch.tensor([ids])).logits.shape == (1, len(ids), len(tok))
    else:
        from sentence_transformers import SentenceTransformer

        emb = SentenceTransformer(str(path), device="cpu").encode(["a great movie", "bad"])
        assert emb.shape == (2, 64)
        assert abs(float((emb[0] ** 2).sum()) - 1.0) < 1e-5  # Normalize module present


def test_weights_are_seeded(tmp_path: Path, zoo: Zoo) -> None:
    again = build_random_model("llama", tmp_path / "llama")
    a = AutoModelForCausalLM.from_pretrained(str(again)).state_dict()
    b = AutoModelForCausalLM.from_pretrained(str(zoo.path("llama"))).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = build_random_model("llama", tmp_path / "other", seed=1)
    c = AutoModelForCausalLM.from_pretrained(str(other)).state_dict()
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_a_build_in_another_process_is_the_same_model(tmp_path: Path, zoo: Zoo, arch: str) -> None:
    # Two replicas built by the same command must agree on token ids, not only on weights: the
    # WordPiece vocabulary once came out different from run to run (hash-map order in the trainer).
    out = tmp_path / arch
    subprocess.run(
        [sys.executable, "-m", "fedbpt_cli.main", "make-random-model", arch, str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    here = zoo.path(arch)
    assert (out / "tokenizer.json").read_bytes() == (here / "tokenizer.json").read_bytes()
    a = AutoModelForMaskedLM.from_pretrained(str(out)).state_dict()
    b = AutoModelForMaskedLM.from_pretrained(str(here)).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_make_random_model_command(tmp_path: Path) -> None:
    assert ("make-random-model", "inference_service.random_models", "make_random_model") in COMMANDS
    app = typer.Typer()
    app.command()(make_random_model)
    runner = CliRunner()
    ok = runner.invoke(app, ["bert", str(tmp_path / "b")])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "b" / "model.safetensors").is_file()
    bad = runner.invoke(app, ["bert", str(tmp_path / "c"), "--size", "roberta-large"])
    assert bad.exit_code != 0 and "not available" in bad.output


def test_cli_modules_import_light() -> None:
    code = (
        "import sys, inference_service.cli, inference_service.random_models, inference_service.settings\n"
        "heavy = [m for m in ('torch', 'fastapi', 'transformers', 'uvicorn', 'sentence_transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
