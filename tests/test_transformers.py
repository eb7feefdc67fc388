"""A converted folder is a transformers model: refused by name without firstlayer, loaded exactly
with it. Registration is process-wide, so each side runs in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, build_tiny, clone, left_padded_batch
from safetensors import safe_open

from firstlayer.conversion import convert
from firstlayer.errors import FirstLayerError
from firstlayer.folder import check
from firstlayer.hf.loading import load, save
from firstlayer.safetensors_io import INDEX_NAME
from firstlayer.tools.verify import FLOAT32_LOGIT_TOLERANCE, verify

# A serial family with a tied LM head, a parallel one, and a tied parallel one (its own route).
SUBPROCESS_FAMILIES = ("llama", "gpt_neox", "falcon")


def family(family_id: str):
    return next(f for f in FAMILIES if f.id == family_id)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("folders")
    return {
        name: convert(build_tiny(family(name)), root / name, max_shard_size=20_000)
        for name in SUBPROCESS_FAMILIES
    }


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "TOKENIZERS_PARALLELISM": "false"},
    )


@pytest.mark.slow
def test_plain_transformers_refuses_the_folder_naming_firstlayer(folders):
    result = run_python(
        f"""
        import sys
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, pipeline
        loaders = {{
            "AutoConfig": AutoConfig.from_pretrained,
            "AutoModel": AutoModel.from_pretrained,
            "AutoModelForCausalLM": AutoModelForCausalLM.from_pretrained,
            "pipeline": lambda folder: pipeline("text-generation", model=folder),
        }}
        for folder in {[str(f) for f in folders.values()]!r}:
            for name, load in loaders.items():
                try:
                    load(folder)
                except Exception as error:
                    print(name, "REFUSED", "firstlayer" in str(error))
                else:
                    print(name, "LOADED")
        assert "firstlayer" not in sys.modules
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split("\n")
    verdicts = [line for line in lines if "REFUSED" in line or "LOADED" in line]
    assert len(verdicts) == 4 * len(folders)
    assert all(line.endswith("REFUSED True") for line in verdicts), verdicts


@pytest.mark.slow
def test_import_firstlayer_is_all_plain_transformers_needs(folders, tmp_path):
    """from_pretrained (dtype, device_map), every generate() mode, save_pretrained and reload,
    firstlayer.save into an existing empty folder: the same tokens as the original, which the
    test saves beside."""
    originals = {}
    for name in SUBPROCESS_FAMILIES:
        original = build_tiny(family(name))
        original.save_pretrained(tmp_path / f"{name}-original")
        originals[name] = str(tmp_path / f"{name}-original")
    result = run_python(
        f"""
        import tempfile
        import torch
        import firstlayer  # the only line a user adds
        from transformers import AutoModelForCausalLM, pipeline

        folders = { ({k: str(v) for k, v in folders.items()})!r}
        originals = {originals!r}
        for name, folder in folders.items():
            original = AutoModelForCausalLM.from_pretrained(originals[name])
            model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", device_map="auto")
            assert type(model).__name__.startswith("FirstLayer"), type(model)
            assert model.dtype == torch.float32
            ids = torch.randint(3, 250, (3, 9), generator=torch.Generator().manual_seed(0))
            with torch.inference_mode():
                diff = (original(input_ids=ids).logits - model(input_ids=ids).logits).abs().max()
            assert diff <= {FLOAT32_LOGIT_TOLERANCE}, (name, diff)
            modes = [
                dict(do_sample=False),
                dict(do_sample=False, num_beams=4),
                dict(do_sample=False, cache_implementation="static"),
                dict(do_sample=True, top_k=20),
            ]
            for mode in modes:
                common = dict(max_new_tokens=32, min_new_tokens=32, pad_token_id=0, **mode)
                torch.manual_seed(3)
                expected = original.generate(input_ids=ids, **common)
                torch.manual_seed(3)
                assert torch.equal(model.generate(input_ids=ids, **common), expected), mode
            model.save_pretrained(folder + "-resaved")
            again = AutoModelForCausalLM.from_pretrained(folder + "-resaved")
            with torch.inference_mode():
                assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
            with tempfile.TemporaryDirectory() as empty:  # an existing, empty folder
                firstlayer.save(model, empty)
                again = firstlayer.load(empty)
            with torch.inference_mode():
                assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
            half = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
            # The table stays mapped in its stored dtype; rows come out in the model's.
            table = half.get_input_embeddings()
            assert table.qkv.dtype == torch.float32 and table.dtype == torch.bfloat16
            print(name, "OK")
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [w for name in SUBPROCESS_FAMILIES for w in (name, "OK")]
    for folder in folders.values():
        check(Path(f"{folder}-resaved"))  # save_pretrained recorded its files' checksums


def test_peft_imported_after_loading_still_knows_the_precomputed_layer_0(folders):
    """from_pretrained asks whether peft is installed (a spec look-up, no import) before the
    user imports it: the import that follows still registers firstlayer with PEFT, so an adapter
    on layer 0's q_proj applies exactly instead of failing on an unknown module."""
    result = run_python(
        f"""
        import torch
        import firstlayer
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folders["llama"])!r})
        from peft import LoraConfig, get_peft_model
        config = LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
        model = get_peft_model(model, config)
        print(type(model.base_model.model.model.layers[0].self_attn.q_proj).__name__)
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "ColumnsLora"


@pytest.mark.slow
def test_pipeline_on_the_converted_smollm2(smollm2, smollm2_converted):
    model, tokenizer = smollm2
    prompt = "The capital of France is"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
    expected_text = tokenizer.decode(expected[0], skip_special_tokens=True)
    result = run_python(
        f"""
        import firstlayer
        from transformers import pipeline
        generator = pipeline("text-generation", model={str(smollm2_converted)!r})
        out = generator({prompt!r}, max_new_tokens=12, do_sample=False)
        print(repr(out[0]["generated_text"]))
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == repr(expected_text)


def test_sharded_folder_converts_loads_checks_and_verifies(tmp_path):
    original = build_tiny(family("qwen3"))
    out = convert(clone(original), tmp_path / "out", max_shard_size=20_000)
    index = json.loads((out / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and not (out / "model.safetensors").exists()
    stored = set()
    for shard in shards:
        with safe_open(out / shard, "pt") as weights:
            stored |= set(weights.keys())
    assert stored == set(index["weight_map"])
    check(out)
    report = verify(original, load(out))
    assert report.max_logit_diff <= FLOAT32_LOGIT_TOLERANCE and report.greedy_equal
    (out / shards[1]).write_bytes((out / shards[1]).read_bytes()[:-64])
    with pytest.raises(FirstLayerError, match="truncated"):
        load(out)


def test_a_missing_weight_is_refused_not_initialised_at_random(tmp_path):
    from transformers import AutoModelForCausalLM

    from firstlayer import precompute

    model = precompute(build_tiny(family("llama")))
    dropped = "model.layers.1.mlp.up_proj.weight"
    state = {k: v for k, v in model.state_dict().items() if k != dropped}
    model.save_pretrained(tmp_path / "out", state_dict=state)
    with pytest.raises(FirstLayerError, match=f"missing: {dropped}"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_save_into_an_existing_empty_folder(tmp_path):
    from firstlayer import precompute

    empty = tmp_path / "empty"
    empty.mkdir()
    save(precompute(build_tiny(family("llama"))), empty)
    check(empty)
    with pytest.raises(FirstLayerError, match="exists: .*--force"):
        save(load(empty), empty)


def test_a_format_1_folder_is_refused_with_the_way_forward(tmp_path):
    out = convert(build_tiny(family("llama")), tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    config["firstlayer"]["format_version"] = 1
    config["model_type"] = "llama"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(FirstLayerError, match="format 1, .*convert the source again"):
        load(out)


def test_precompute_gives_a_model_whose_save_pretrained_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    from firstlayer import precompute

    original = build_tiny(family("gemma"))
    model = precompute(clone(original))
    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    batch = left_padded_batch(original.config.vocab_size)
    with torch.inference_mode():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
