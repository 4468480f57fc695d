"""Aspect-ratio bucketing: the buckets, the pipeline's one-shape batches, SDXL's size/crop conditioning,
a 2-worker DDP run whose workers get different numbers of bucket batches (and must not hang), and the
same on a bucketed latent cache (its rows, its validation batches by shape, staleness)."""

import io
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import ray.data
import torch
from conftest import make_job
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image

from sdray import storage
from sdray.data.buckets import bucket_batches, buckets_for, compute_buckets, nearest_bucket
from sdray.data.digits import digit_images
from sdray.data.pipeline import build_datasets
from sdray.models.build import data_requirements
from sdray.spec import BucketingSpec, SpecError, parse_job
from sdray.train.context import iterate
from sdray.train.launch import run_in_process, run_job

# The test settings: 32 px, sides 16–48 in steps of 8, up to 3:1 → five buckets (width, height).
SETTINGS = {"step": 8, "min_size": 16, "max_size": 48, "max_aspect": 3}
BUCKETS = [(16, 48), (24, 40), (32, 32), (40, 24), (48, 16)]
# What each kind of image in the dataset becomes: (height, width) written → bucket (height, width) and
# the center crop's (top, left) in the image resized to cover the bucket.
KINDS = {
    "square": ((32, 32), (32, 32), (0, 0)),
    "wide": ((32, 64), (24, 40), (0, 4)),  # 64×32 → 48×24, 4 px cropped off each side
    "tall": ((64, 32), (40, 24), (4, 0)),
}
# SDXL's published bucket list (width, height), from the SDXL report's appendix.
SDXL = {(512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
        (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
        (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024)}
SDXL |= {(h, w) for w, h in SDXL}


@pytest.mark.parametrize("resolution,step,low,high,aspect", [(32, 8, 16, 48, 3), (512, 64, 256, 1024, 2.0),
                                                             (1024, 64, 512, 2048, 4.0), (48, 16, 16, 80, 4.0)])
def test_buckets_are_valid_maximal_and_symmetric(resolution, step, low, high, aspect):
    buckets = compute_buckets(resolution, step=step, min_size=low, max_size=high, max_aspect=aspect)
    assert len(buckets) >= 3 and len(set(buckets)) == len(buckets)
    for w, h in buckets:
        assert w % step == 0 and h % step == 0 and low <= min(w, h) and max(w, h) <= high
        assert w * h <= resolution**2 and max(w, h) / min(w, h) <= aspect
        assert (h, w) in buckets
        # the tallest for its width, or the transpose of one (kohya and SDXL list both)
        assert any(a * (b + step) > resolution**2 or b + step > high for a, b in ((w, h), (h, w)))
    assert (resolution, resolution) in buckets
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios)


def test_sdxl_settings_give_sdxl_buckets():
    ours = set(buckets_for(BucketingSpec(), 1024))  # defaults: step 64, 512–2048, up to 4:1
    assert ours <= SDXL and len(ours) >= 25
    assert {(1024, 1024), (1152, 896), (1216, 832), (1344, 768), (1536, 640), (2048, 512)} <= ours


def test_images_go_to_the_nearest_aspect_ratio():
    assert compute_buckets(32, **SETTINGS) == BUCKETS
    for (w, h), bucket in {(32, 32): (32, 32), (64, 32): (40, 24), (32, 64): (24, 40), (500, 480): (32, 32),
                           (96, 32): (48, 16), (1000, 10): (48, 16), (30, 100): (16, 48)}.items():
        assert nearest_bucket(w, h, BUCKETS) == bucket, (w, h)
    # log-ratio distance: 2.2:1 is nearer 5:3 than 3:1 (0.28 vs 0.31); 2.4:1 is nearer 3:1 (0.22 vs 0.37)
    assert nearest_bucket(220, 100, BUCKETS) == (40, 24) and nearest_bucket(240, 100, BUCKETS) == (48, 16)


def _doc(**bucketing):
    return make_job("b", "/tmp/unused", "/tmp/unused", data={"uri": "/tmp/unused", "bucketing": bucketing})


@pytest.mark.parametrize("bucketing,field", [
    ({"step": 12}, "spec.data.bucketing.step"),
    ({"step": 8, "min_size": 48, "max_size": 16}, "spec.data.bucketing.min_size"),
    ({"max_aspect": 0.5}, "spec.data.bucketing.max_aspect"),
    ({"step": 64, "max_size": 32}, "spec.data.bucketing.max_size"),
    ({"colour": 1}, "spec.data.bucketing.colour"),
])
def test_bad_bucketing_settings_name_the_field(bucketing, field):
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        parse_job(_doc(**bucketing))


def test_resize_and_bucketing_are_refused_together_and_empty_bucket_lists_explained():
    doc = _doc(step=8)
    doc["spec"]["data"]["resize"] = 24
    with pytest.raises(SpecError, match=r"spec\.data\.resize does not apply with bucketing"):
        parse_job(doc)
    doc["spec"]["data"]["bucketing"]["enabled"] = False
    parse_job(doc)
    # the tiny preset's 16 px with the default step of 64: no bucket at all
    with pytest.raises(ValueError, match=r"spec\.data\.bucketing\.step: no side that is a multiple of 64"):
        buckets_for(BucketingSpec(), 16)


def test_bucket_batches_hold_one_shape_and_drop_leftovers():
    sizes = [(24, 40)] * 7 + [(32, 32)] * 5 + [(40, 24)] * 2
    order = np.random.default_rng(0).permutation(len(sizes))
    rows = [{"key": np.array([f"k{i}"], dtype=object), "target_size": np.array([sizes[i]]),
             "pixel_values": np.zeros((1, 3, *sizes[i]), np.float32)} for i in order]
    batches = list(bucket_batches(iter(rows), 3))
    assert sorted(tuple(b["target_size"][0]) for b in batches) == [(24, 40), (24, 40), (32, 32)]
    for b in batches:
        assert b["pixel_values"].shape[0] == 3 and all(tuple(s) == tuple(b["target_size"][0]) for s in b["target_size"])
        assert b["pixel_values"].shape[2:] == tuple(b["target_size"][0])


@pytest.fixture(scope="module")
def mixed_aspect_root(tmp_path_factory):
    """120 digits at 32 px as an imagefolder: 50 square, then 40 padded to 2:1, then 30 padded to 1:2 (in
    this order, so that workers splitting the rows get different mixes of buckets)."""
    root = tmp_path_factory.mktemp("mixed")
    (root / "images").mkdir()
    pngs, labels = digit_images(32)
    lines = []
    for i in range(120):
        kind = "square" if i < 50 else "wide" if i < 90 else "tall"
        (h, w), _, _ = KINDS[kind]
        canvas = Image.new("RGB", (w, h))
        canvas.paste(Image.open(io.BytesIO(pngs[i])), ((w - 32) // 2, (h - 32) // 2))
        name = f"images/{kind}_{i:03d}.png"
        canvas.save(root / name)
        lines.append(json.dumps({"file_name": name, "text": f"a handwritten digit {labels[i]}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def bucketed_job(name, out, root, **spec):
    return make_job(name, out, str(root), model={"preset": "tiny-xl", "resolution": 32},
                    data={"bucketing": SETTINGS, **spec.pop("data", {})}, **spec)


def _kind(key: str) -> str:
    return key.rsplit("/", 1)[-1].split("_")[0]


def test_pipeline_batches_hold_one_bucket_and_sdxl_gets_the_crop(ray_session, mixed_aspect_root, tmp_path, request):
    spec = parse_job(bucketed_job("pipe", tmp_path, mixed_aspect_root, data={"validation_fraction": 0.2})).spec
    resolution, tokenizers = data_requirements(spec.model)
    data = build_datasets(spec, resolution=resolution, tokenizers=tokenizers)
    request.addfinalizer(data.close)
    seen = set()
    for batch in iterate(data.train, batch_size=4, shuffle=True, bucketed=True):
        target = tuple(batch["target_size"][0].tolist())
        assert batch["pixel_values"].shape[1:] == (3, *target)  # one shape per batch: the bucket's
        for key, size, corner, bucket in zip(batch["key"], batch["original_size"], batch["crop_top_left"],
                                             batch["target_size"]):
            assert (tuple(size.tolist()), tuple(bucket.tolist()), tuple(corner.tolist())) == KINDS[_kind(key)]
        seen.add(target)
    assert seen == {bucket for _, bucket, _ in KINDS.values()}
    # validation stays square at the model's resolution
    val = next(iterate(data.validation, batch_size=4, shuffle=False))
    assert val["pixel_values"].shape[1:] == (3, 32, 32) and "target_size" not in val

    # SDXL's time ids: original size, crop corner, then the bucket as target size
    from sdray.models.build import build_components
    from sdray.models.conditioning import encode_prompts

    comps = build_components(spec.model, seed=0)
    seen = {}

    def unet(noisy, timesteps, **kwargs):  # what the family passes the UNet
        seen.update(kwargs)
        return SimpleNamespace(sample=noisy)

    n = len(batch["key"])
    comps.family.predict(unet, torch.zeros(n, 4, 4, 4), torch.zeros(n), encode_prompts(comps, batch), batch,
                         resolution=comps.resolution)
    expected = torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], dim=1)
    assert torch.equal(seen["added_cond_kwargs"]["time_ids"], expected.float())


def test_in_process_run_conditions_the_sdxl_unet_on_each_bucketed_crop(ray_session, mixed_aspect_root, tmp_path):
    job = parse_job(bucketed_job("inproc", tmp_path / "out", mixed_aspect_root,
                                 train={"max_steps": 12, "batch_size": 12, "log_every_n_steps": 4},
                                 checkpoint={"uri": str(tmp_path / "ckpt"), "every_n_steps": 12}))
    calls = []

    def record(module, args, kwargs, _):  # what the loop feeds the SDXL UNet
        if isinstance(module, UNet2DConditionModel):
            calls.append((args[0].shape, kwargs["added_cond_kwargs"]["time_ids"].clone()))

    hook = torch.nn.modules.module.register_module_forward_hook(record, with_kwargs=True)
    try:
        summary = run_in_process(job)
    finally:
        hook.remove()
    assert summary["step"] == 12 and len(summary["batch_shapes"]) == 3
    assert sum(summary["batch_shapes"].values()) == 12
    # an epoch is 4 + 3 + 2 full batches of 12 (50, 40, 30 rows; the rest dropped): step 12 is in epoch 1
    assert summary["epoch"] == 1
    assert len(calls) == 12 and len({shape for shape, _ in calls}) == 3
    for latent_shape, time_ids in calls:
        bucket = (latent_shape[2] * 2, latent_shape[3] * 2)  # the tiny VAE halves each side
        for row in time_ids.long().tolist():
            original, corner, target = tuple(row[:2]), tuple(row[2:4]), tuple(row[4:])
            assert target == bucket and (original, target, corner) in KINDS.values()
    assert all(math.isfinite(json.loads(line).get("loss", 0.0))
               for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines())


def test_autoencoder_stage_trains_on_buckets(ray_session, mixed_aspect_root, tmp_path):
    job = parse_job(make_job("ae-buckets", tmp_path / "out", str(mixed_aspect_root), stage="autoencoder",
                             model={"preset": "tiny", "resolution": 32}, data={"bucketing": SETTINGS},
                             train={"max_steps": 9, "batch_size": 12, "log_every_n_steps": 3},
                             checkpoint={"uri": str(tmp_path / "ckpt"), "every_n_steps": 9}))
    summary = run_in_process(job)
    # latents of several shapes set the exported scaling factor; the reconstruction grid is drawn
    assert summary["step"] == 9 and len(summary["batch_shapes"]) == 3  # one epoch: 4 + 3 + 2 batches
    assert math.isfinite(summary["scaling_factor"]) and (tmp_path / "out" / "samples" / "final.png").exists()


@pytest.mark.timeout(300)  # without lockstep epochs this run waits forever in a collective
@pytest.mark.slow  # 2-worker Ray Train run (~70 s)
def test_two_ddp_workers_train_on_buckets_without_hanging(ray_session, mixed_aspect_root, tmp_path):
    out = tmp_path / "out"
    job = parse_job(bucketed_job(
        "buckets-ddp", out, mixed_aspect_root,
        train={"max_steps": 16, "batch_size": 8, "learning_rate": 1e-3, "log_every_n_steps": 4},
        distributed={"num_workers": 2, "resources_per_worker": {"CPU": 1}},
        checkpoint={"every_n_steps": 16, "keep_last": 1},
    ))
    summary = run_job(job)
    # 60 rows a worker, 8-row batches of up to 3 buckets: 6 or 7 batches an epoch, different on the two
    # workers (their mixes of buckets differ), so 16 steps cross epochs where one worker runs out first
    assert summary["step"] == 16 and summary["epoch"] >= 2
    # batches of both workers: only 50 rows are square, so they cannot all be square
    assert len(summary["batch_shapes"]) > 1 and sum(summary["batch_shapes"].values()) == 2 * 16
    pipe = StableDiffusionXLPipeline.from_pretrained(out / "pipeline")
    image = pipe("a handwritten digit 3", num_inference_steps=2, height=24, width=40,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (40, 24)


# -- bucketing with a latent cache -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bucketed_cache(ray_session, mixed_aspect_root, tmp_path_factory):
    """The 120 mixed-aspect digits precomputed with bucketing and random_flip (tiny-xl, 32 px)."""
    from sdray.data.precompute import precompute

    root = tmp_path_factory.mktemp("bucketed-cache")
    job = parse_job(bucketed_job("bucket-pre", root / "out", mixed_aspect_root, data={"random_flip": True}))
    # 10-row encoder batches: most hold one bucket only (the rows come square, wide, then tall)
    manifest = precompute(job, str(root / "cache"), batch_size=10, concurrency=1)
    return root / "cache", manifest


def _cached_job(name, out, cache, bucketing=SETTINGS, **spec):
    data = {"uri": str(cache), "format": "latents", "random_flip": True, "bucketing": bucketing,
            **spec.pop("data", {})}
    return make_job(name, out, str(cache), model={"preset": "tiny-xl", "resolution": 32}, data=data, **spec)


def test_a_bucketed_cache_holds_each_image_at_its_bucket_as_online_encoding_does(bucketed_cache, mixed_aspect_root):
    from ray.data.extensions import ArrowVariableShapedTensorType

    from sdray.data.augment import BucketPreprocess
    from sdray.data.precompute import Encode
    from sdray.models.build import build_components
    from sdray.models.encoding import latent_distribution

    cache, manifest = bucketed_cache
    assert manifest["rows"] == 120 and "target_size" in manifest["columns"]
    assert manifest["transform"]["bucketing"] == {"min_size": 16, "max_size": 48, "step": 8, "max_aspect": 3}
    fs, path = storage.filesystem(str(cache))
    rows = {str(r["key"]): r for r in ray.data.read_parquet(path, filesystem=fs, file_extensions=["parquet"]).take_all()}
    assert len(rows) == 120
    for key, row in rows.items():
        original, bucket, corner = KINDS[_kind(key)]
        assert tuple(row["target_size"].tolist()) == bucket and tuple(row["original_size"].tolist()) == original
        assert tuple(row["crop_top_left"].tolist()) == corner
        for column in ("latent_dist", "latent_dist_flipped"):  # the tiny VAE halves each side; mean + logvar
            assert row[column].shape == (8, bucket[0] // 2, bucket[1] // 2), (key, column)

    # every file has the same schema, latents variable-shaped even in one-bucket batches: plain pyarrow
    # reads the folder as one table
    import pyarrow.parquet as pq

    files = [f for f in storage.list_files(str(cache)) if f.endswith(".parquet")]
    assert len(files) > 1 and pq.read_table(files, filesystem=fs).num_rows == 120

    # every image, encoded online through the same transform, gives the cached distributions
    spec = parse_job(bucketed_job("online", "unused", mixed_aspect_root)).spec
    comps = build_components(spec.model, seed=0)
    step = BucketPreprocess(resolution=32, resize=None, crop="center", random_flip=False,
                            tokenizers=comps.tokenizers, buckets=buckets_for(spec.data.bucketing, 32))
    encode = Encode(model=spec.model, s3=spec.storage, seed=0, flip=True, dtype="float32", use_gpu=False, threads=1)
    for kind in KINDS:
        names = sorted(k for k in rows if _kind(k) == kind)
        raw = {"key": np.array(names, dtype=object), "caption": np.array(["-"] * len(names), dtype=object),
               "image": np.array([(mixed_aspect_root / "images" / k.rsplit("/", 1)[-1]).read_bytes() for k in names],
                                 dtype=object)}
        preprocessed = step(raw)
        pixels = torch.from_numpy(np.stack(list(preprocessed["pixel_values"])))
        with torch.no_grad():
            expected, mirrored = latent_distribution(comps.vae, pixels), latent_distribution(comps.vae, pixels.flip(-1))
        for i, key in enumerate(names):
            np.testing.assert_allclose(rows[key]["latent_dist"], expected[i].numpy(), atol=1e-4, rtol=1e-4)
            np.testing.assert_allclose(rows[key]["latent_dist_flipped"], mirrored[i].numpy(), atol=1e-4, rtol=1e-4)
        # an encoder batch of one bucket still writes variable-shaped latents (files of a cache agree)
        table = encode(preprocessed)
        for column in ("latent_dist", "latent_dist_flipped"):
            assert isinstance(table.schema.field(column).type, ArrowVariableShapedTensorType), column


@pytest.mark.slow  # precompute and a Ray Train run (~40 s)
def test_training_on_a_bucketed_cache_batches_by_bucket_and_validates_by_shape(bucketed_cache, tmp_path, request):
    from sdray.train.context import LocalContext
    from sdray.train.loop import Trainer

    cache, _ = bucketed_cache
    out = tmp_path / "out"
    job = parse_job(_cached_job("cache-buckets", out, cache, data={"validation_fraction": 0.25},
                                train={"max_steps": 9, "batch_size": 8, "log_every_n_steps": 3},
                                validation={"every_n_steps": 3, "max_batches": 4},
                                checkpoint={"every_n_steps": 9}))
    data = build_datasets(job.spec, resolution=32)
    request.addfinalizer(data.close)
    ctx = LocalContext(train=data.train, validation=data.validation, batch_size=8, shuffle=True,
                       run_dir=tmp_path / "ckpt", keep_last=1, bucketed=True)
    trainer = Trainer(job, ctx)
    assert trainer.comps.vae is None  # training reads the cache: no encoder was built
    # the held-out rows of all three buckets, grouped into batches of one shape, in key order within each
    val = trainer._validation_set()
    shapes = [tuple(b["latent_dist"].shape[2:]) for b in val]
    assert {(s[0] * 2, s[1] * 2) for s in shapes} == {bucket for _, bucket, _ in KINDS.values()}
    for batch in val:
        assert batch["key"] == sorted(batch["key"]) and len({_kind(k) for k in batch["key"]}) == 1
        assert all(tuple(t.tolist()) == tuple(batch["target_size"][0].tolist()) for t in batch["target_size"])

    calls = []

    def record(module, args, kwargs, _):
        if isinstance(module, UNet2DConditionModel) and module.training:
            calls.append((args[0].shape, kwargs["added_cond_kwargs"]["time_ids"].clone()))

    hook = torch.nn.modules.module.register_module_forward_hook(record, with_kwargs=True)
    try:
        summary = trainer.run()
    finally:
        hook.remove()
    assert summary["step"] == 9 and sum(summary["batch_shapes"].values()) == 9
    assert len(calls) == 9 and len({shape for shape, _ in calls}) > 1
    for latent_shape, time_ids in calls:  # SDXL conditioning: the cached original size and crop, the bucket
        bucket = (latent_shape[2] * 2, latent_shape[3] * 2)
        for row in time_ids.long().tolist():
            assert (tuple(row[:2]), tuple(row[4:]), tuple(row[2:4])) in KINDS.values() and tuple(row[4:]) == bucket
    val_losses = [json.loads(line)["val_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                  if "val_loss" in line]
    assert len(val_losses) >= 3 and all(math.isfinite(v) for v in val_losses)
    pipe = StableDiffusionXLPipeline.from_pretrained(out / "pipeline")
    assert pipe("a handwritten digit 3", num_inference_steps=2, height=24, width=40).images[0].size == (40, 24)


@pytest.mark.slow  # test-time budget: lockstep epochs are covered on images above, Ray Train on a cache in test_latents
@pytest.mark.timeout(300)
def test_two_ray_train_workers_train_on_a_bucketed_cache_without_hanging(bucketed_cache, tmp_path):
    cache, _ = bucketed_cache
    summary = run_job(parse_job(_cached_job(
        "cache-ddp", tmp_path / "out", cache, train={"max_steps": 12, "batch_size": 8, "log_every_n_steps": 4},
        distributed={"num_workers": 2, "resources_per_worker": {"CPU": 1}},
        checkpoint={"every_n_steps": 12, "keep_last": 1})))
    assert summary["step"] == 12 and len(summary["batch_shapes"]) > 1
    assert sum(summary["batch_shapes"].values()) == 2 * 12


def test_a_cache_made_with_other_bucket_settings_or_none_is_stale(bucketed_cache, tmp_path):
    from sdray.data.latents import StaleCacheError, check_cache

    cache, _ = bucketed_cache
    check_cache(parse_job(_cached_job("same", tmp_path, cache)).spec)  # the same settings: accepted
    other = parse_job(_cached_job("other", tmp_path, cache, bucketing={**SETTINGS, "max_aspect": 2})).spec
    with pytest.raises(StaleCacheError, match=r'spec\.data\.bucketing is \{"min_size": 16, "max_size": 48, '
                                              r'"step": 8, "max_aspect": 2.0\} here, .*"max_aspect": 3.0\} in the cache'):
        check_cache(other)
    square = parse_job(_cached_job("square", tmp_path, cache, bucketing=None)).spec
    with pytest.raises(StaleCacheError, match=r"stale: spec\.data\.bucketing is null here, \{.*\} in the cache\. "):
        check_cache(square)  # one line about bucketing, none about resize (which only square caches have)

    # A square cache from before bucketing existed: its manifest has no bucketing entry at all.
    manifest = json.loads((cache / "manifest.json").read_text())
    old = tmp_path / "old-cache"
    old.mkdir()
    transform = {k: v for k, v in manifest["transform"].items() if k != "bucketing"}
    (old / "manifest.json").write_text(json.dumps({**manifest, "transform": {**transform, "resize": 32}}))
    check_cache(parse_job(_cached_job("old-square", tmp_path, old, bucketing=None)).spec)  # still accepted
    with pytest.raises(StaleCacheError, match=r'spec\.data\.bucketing is \{"min_size": 16.*\} here, null in the cache'):
        check_cache(parse_job(_cached_job("old-bucketed", tmp_path, old)).spec)
