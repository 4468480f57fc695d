"""Hugging Face Hub model sources (hf://org/name[@revision], bare org/name): offline from a cache laid out as
the hub lays it out (built here from tiny pipelines the tests save), the errors of an uncached repository or
revision, the job's token on the wire to a Hub on 127.0.0.1, and training from a Hub model in-process."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from conftest import make_job
from diffusers import StableDiffusionPipeline
from hub_cache import add_snapshot
from huggingface_hub import constants

from sdray.models.build import ModelError, build_components, frozen_fingerprints, model_family
from sdray.models.pipeline import assemble_pipeline
from sdray.spec import ModelSpec, SpecError, parse_job
from sdray.train.launch import run_in_process

REPO = "sdray-test/tiny-sd"
TOKEN = "hf_tenantSecretTokenValue0123456789"  # never to be seen outside the request to the Hub


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny pipelines the tests save, and a hub cache holding them: REPO at main (seed 7), at tag v1 (seed 8),
    at tag same-files (main's files as another commit); sdray-test/tiny-xl (an SDXL pipeline) and
    sdray-test/tiny-vae (one AutoencoderKL at the repository's root)."""
    root = tmp_path_factory.mktemp("hub")
    comps = {}
    for name, preset, seed in (("main", "tiny", 7), ("v1", "tiny", 8), ("xl", "tiny-xl", 9)):
        comps[name] = build_components(ModelSpec(preset=preset), seed=seed)
        assemble_pipeline(comps[name]).save_pretrained(root / name, safe_serialization=True)
    cache = root / "cache"
    commits = {"main": add_snapshot(cache, REPO, root / "main"),
               "v1": add_snapshot(cache, REPO, root / "v1", refs=("v1",)),
               "same-files": add_snapshot(cache, REPO, root / "main", refs=("same-files",), salt="again")}
    add_snapshot(cache, "sdray-test/tiny-xl", root / "xl")
    add_snapshot(cache, "sdray-test/tiny-vae", root / "v1" / "vae")
    return {"root": root, "cache": cache, "comps": comps, "commits": commits}


@pytest.fixture
def hub(saved, monkeypatch, tmp_path):
    """The hub cache of ``saved`` as this node's (HF_HUB_CACHE), offline, from a working directory without
    folders named like the repositories."""
    monkeypatch.setenv("HF_HUB_CACHE", str(saved["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return saved


@pytest.mark.parametrize("field", ["pretrained", "tokenizer", "vae"])
@pytest.mark.parametrize("value", ["hf://org", "hf://org/na me", "hf://org/name@", "hf://-org/name", "hf://org--x/name",
                                   "hf://org/name@../../../etc", "hf://a/b/c", "hf://org/name@v1/", "hf://" + "x" * 97 + "/y"])
def test_malformed_hub_names_are_refused_by_the_spec(field, value):
    model = {"preset": "tiny", field: {"pretrained": value} if field == "vae" else value}
    doc = {"apiVersion": "sdray.io/v1alpha1", "kind": "DiffusionJob", "metadata": {"name": "x"},
           "spec": {"model": model, "data": {"uri": "/d"}, "output": {"uri": "/o"}}}
    path = "spec.model.vae.pretrained" if field == "vae" else f"spec.model.{field}"
    with pytest.raises(SpecError, match=rf"{path}: .*expected hf://org/name\[@revision\]") as err:
        parse_job(doc)
    assert len(err.value.errors) == 1


def test_a_hub_pipeline_loads_offline_in_every_form(hub, tmp_path):
    main, v1 = hub["comps"]["main"], hub["comps"]["v1"]
    for source in (f"hf://{REPO}", REPO, f"hf://{REPO}@main", f"{REPO}@{hub['commits']['main']}"):
        loaded = build_components(ModelSpec(pretrained=source), seed=99)
        assert _same(loaded.unet, main.unet) and _same(loaded.text_encoder, main.text_encoder), source
        assert loaded.tokenizer.get_vocab() == main.tokenizer.get_vocab()
    tagged = build_components(ModelSpec(pretrained=f"hf://{REPO}@v1"))
    assert _same(tagged.unet, v1.unet) and not _same(tagged.unet, main.unet)
    # a bare org/name that exists as a local path is that path
    (tmp_path / "sdray-test").mkdir()
    (tmp_path / "sdray-test" / "tiny-sd").symlink_to(hub["root"] / "v1")
    assert _same(build_components(ModelSpec(pretrained=REPO)).unet, v1.unet)
    assert _same(build_components(ModelSpec(pretrained=f"hf://{REPO}")).unet, main.unet)  # hf:// never is


def test_the_family_is_the_cached_pipelines_and_vae_and_tokenizer_come_from_the_hub(hub):
    assert model_family(ModelSpec(pretrained="hf://sdray-test/tiny-xl")).name == "sdxl"
    xl = build_components(ModelSpec(pretrained="hf://sdray-test/tiny-xl"))
    assert xl.family.name == "sdxl" and _same(xl.text_encoders["text_encoder_2"],
                                              hub["comps"]["xl"].text_encoders["text_encoder_2"])
    with pytest.raises(ModelError, match=r"spec.model.family: .*spec.model.pretrained \(StableDiffusionXLPipeline\) "
                                         "is sdxl"):
        model_family(ModelSpec(pretrained="hf://sdray-test/tiny-xl", family="sd"))
    v1 = hub["comps"]["v1"]
    for vae in ("hf://sdray-test/tiny-vae", f"hf://{REPO}@v1"):  # one component; a pipeline's vae/
        assert _same(build_components(ModelSpec(preset="tiny", vae={"pretrained": vae})).vae, v1.vae)
    tok = build_components(ModelSpec(preset="tiny", tokenizer=f"hf://{REPO}@v1")).tokenizer
    assert tok.get_vocab() == v1.tokenizer.get_vocab()


def test_an_uncached_repository_or_revision_offline_is_one_clear_line(hub):
    cache = hub["cache"]
    for source in ("hf://sdray-test/absent", "sdray-test/absent"):
        with pytest.raises(ModelError) as err:
            build_components(ModelSpec(pretrained=source))
        assert str(err.value) == (f"spec.model.pretrained: hf://sdray-test/absent: sdray-test/absent is not in the "
                                  f"Hugging Face cache at {cache}; run online once or unset HF_HUB_OFFLINE")
    with pytest.raises(ModelError) as err:
        build_components(ModelSpec(preset="tiny", vae={"pretrained": f"hf://{REPO}@v9"}))
    assert str(err.value) == (f"spec.model.vae.pretrained: hf://{REPO}@v9: revision 'v9' of {REPO} is not in the "
                              f"Hugging Face cache at {cache} (cached: main, same-files, v1); run online once or unset "
                              "HF_HUB_OFFLINE")


def test_fingerprints_name_the_resolved_commit(hub):
    """A latent cache records its frozen models' fingerprints: one made from another revision is stale, even
    when that revision's files are the same."""
    commits = hub["commits"]
    main = frozen_fingerprints(ModelSpec(pretrained=f"hf://{REPO}"))
    assert main == {"vae": f"hub:{REPO}@{commits['main']}/vae", "tokenizer": f"hub:{REPO}@{commits['main']}/tokenizer",
                    "text_encoder": f"hub:{REPO}@{commits['main']}/text_encoder"}
    again = frozen_fingerprints(ModelSpec(pretrained=f"hf://{REPO}@same-files"))
    assert all(again[k] != main[k] and commits["same-files"] in again[k] for k in main)
    local = frozen_fingerprints(ModelSpec(pretrained=str(hub["root"] / "main")))
    assert all(v.startswith("files:") for v in local.values())


def test_a_hub_model_trains_in_process_with_a_token_secret_that_is_never_written(ray_session, digits_root, hub,
                                                                                 tmp_path, monkeypatch, caplog, capfd):
    secrets = tmp_path / "secrets"
    (secrets / "team-a-hf").mkdir(parents=True)
    (secrets / "team-a-hf" / "HF_TOKEN").write_text(TOKEN + "\n")
    monkeypatch.setenv("SDRAY_SECRETS_DIR", str(secrets))
    caplog.set_level("DEBUG")
    out = tmp_path / "out"
    doc = make_job("from-hub", out, str(digits_root / "imagefolder"),
                   model={"pretrained": f"hf://{REPO}@v1", "hub": {"credentials_secret": "team-a-hf"}},
                   train={"max_steps": 4, "batch_size": 8, "log_every_n_steps": 2},
                   checkpoint={"every_n_steps": 2, "keep_last": 1})
    summary = run_in_process(parse_job(doc))
    assert summary["step"] == 4
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses and all(loss == loss and loss < 10 for loss in losses)
    exported = StableDiffusionPipeline.from_pretrained(out / "pipeline")
    assert not _same(exported.unet, hub["comps"]["v1"].unet)  # trained from v1's weights, and moved
    assert json.loads((out / "summary.json").read_text())["step"] == 4
    written = [p for p in out.rglob("*") if p.is_file()]
    assert written and not [p for p in written if TOKEN.encode() in p.read_bytes()]
    captured = capfd.readouterr()
    assert TOKEN not in caplog.text + captured.out + captured.err


class _FakeHub(BaseHTTPRequestHandler):
    """The Hub's answers to ``repo_info`` (GET /api/models/<org>/<name>/revision/<rev>) for a gated, a
    private and a present repository (whose revision 'nope' does not exist); records each Authorization."""

    seen: list = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        type(self).seen.append((self.path, self.headers.get("Authorization")))
        if "/gated/" in self.path:
            status, code = 403, "GatedRepo"
        elif "/private/" in self.path:
            status, code = 401, "RepoNotFound"
        else:
            status, code = 404, "RevisionNotFound"
        body = json.dumps({"error": code}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def online_hub(monkeypatch, tmp_path):
    """A Hub on 127.0.0.1 (HF_ENDPOINT), online, with an empty cache and HF_TOKEN set in the environment."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _FakeHub.seen = []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_TOKEN", "hf_fromTheEnvironment")
    secrets = tmp_path / "secrets"
    (secrets / "team-a-hf").mkdir(parents=True)
    (secrets / "team-a-hf" / "HF_TOKEN").write_text(TOKEN)
    (secrets / "empty").mkdir()
    monkeypatch.setenv("SDRAY_SECRETS_DIR", str(secrets))
    yield _FakeHub
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def test_the_jobs_token_goes_to_the_hub_and_refusals_are_one_line(online_hub):
    own = {"credentials_secret": "team-a-hf"}
    with pytest.raises(ModelError) as err:
        build_components(ModelSpec(pretrained="hf://gated/model", hub=own))
    assert str(err.value) == ("spec.model.pretrained: hf://gated/model: gated/model is gated: accept its conditions "
                              "on the Hub with the account of the job's token (spec.model.hub.credentials_secret "
                              "'team-a-hf'), then retry")
    assert online_hub.seen[-1] == ("/api/models/gated/model/revision/main", f"Bearer {TOKEN}")  # not HF_TOKEN's
    with pytest.raises(ModelError, match=r"^spec.model.pretrained: hf://private/model: private/model not found on the "
                                         r"Hub, or private and the job's token \(HF_TOKEN, or none\) cannot read it$"):
        build_components(ModelSpec(pretrained="hf://private/model"))
    assert online_hub.seen[-1][1] == "Bearer hf_fromTheEnvironment"  # no secret named: the environment's
    with pytest.raises(ModelError, match=r"^spec.model.tokenizer: hf://org/model@nope: revision 'nope' not found in "
                                         r"org/model \(give a branch, tag or commit of the repository\)$"):
        build_components(ModelSpec(preset="tiny", tokenizer="hf://org/model@nope"))
    with pytest.raises(ModelError, match=r"credentials_secret 'empty': expected a file HF_TOKEN holding the token"):
        build_components(ModelSpec(pretrained="hf://org/model", hub={"credentials_secret": "empty"}))
