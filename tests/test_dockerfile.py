"""The Dockerfile, checked statically: no container engine runs here, so the image is never built in the tests."""

from __future__ import annotations

import json
import re
import shlex

from k8s_checks import REPO

from sdray.k8s.render import RUN_AS

DOCKERFILE = REPO / "Dockerfile"
SECRET_NAME = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL)", re.IGNORECASE)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined and comments dropped, as Docker reads them."""
    result, pending = [], ""
    for line in text.splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        result.append((word.upper(), rest.strip()))
        pending = ""
    return result


def stages() -> tuple[dict[str, str], list[dict]]:
    """The global ARG defaults, and each stage: its base (ARGs resolved), name and instructions."""
    global_args, found = {}, []
    for word, rest in instructions(DOCKERFILE.read_text()):
        if word == "FROM":
            image, _, name = rest.partition(" AS ")
            for key, value in global_args.items():
                image = image.replace("${%s}" % key, value)
            found.append({"base": image, "name": name.strip(), "body": []})
        elif not found and word == "ARG":
            key, _, value = rest.partition("=")
            global_args[key] = value
        else:
            found[-1]["body"].append((word, rest))
    return global_args, found


def test_multi_stage_with_pinned_bases():
    args, found = stages()
    names = {s["name"] for s in found}
    assert {"build", "base-cpu", "base-cuda", "runtime"} <= names
    assert args["VARIANT"] == "cuda"  # GPU clusters by default; --build-arg VARIANT=cpu for the other base
    external = [s["base"] for s in found if s["base"] not in names]
    assert external == [args["PYTHON_IMAGE"], args["PYTHON_IMAGE"], args["CUDA_IMAGE"]]
    for image in external:
        name, _, tag = image.partition(":")
        assert tag and tag != "latest" and re.match(r"^\d+\.\d+\.\d+", tag), f"{image}: pin a full version tag"
    assert found[-1]["name"] == "runtime" and found[-1]["base"] == "base-cuda"  # FROM base-${VARIANT}


def test_runs_as_the_non_root_user_the_manifests_expect():
    runtime = stages()[1][-1]["body"]
    users = [i for i, (word, _) in enumerate(runtime) if word == "USER"]
    assert users, "the runtime stage has no USER"
    assert runtime[users[-1]][1] == f"{RUN_AS}:{RUN_AS}"  # numeric: runAsNonRoot can check it
    assert all(word != "RUN" for word, _ in runtime[users[-1]:]), "RUN after USER would need root"
    assert f"--uid {RUN_AS}" in " ".join(rest for word, rest in runtime if word == "RUN")
    chart = (REPO / "helm" / "sdray" / "templates" / "_helpers.tpl").read_text()
    assert f"runAsUser: {RUN_AS}" in chart


def test_the_project_is_installed_as_a_wheel_with_pinned_versions():
    _, found = stages()
    build = next(s for s in found if s["name"] == "build")["body"]
    runtime = found[-1]["body"]
    assert any("python -m build --wheel" in rest for word, rest in build if word == "RUN")
    assert [rest for word, rest in build if word == "COPY"] == ["pyproject.toml README.md ./", "sdray ./sdray"]
    runs = [rest for word, rest in build + runtime if word == "RUN"]
    assert any("--no-deps /tmp/wheels/sdray-*.whl" in r for r in runs)
    for run in runs:
        for command in run.split("&&"):
            words = shlex.split(command)
            if words[:2] == ["pip", "install"]:
                named = [w for w in words[2:] if not w.startswith("-") and not w.startswith(("/", "http", "${"))
                         and "requirements" not in w]
                assert all("==" in w for w in named), f"unpinned: {command.strip()}"
                assert "--no-cache-dir" in words, f"pip cache left in a layer: {command.strip()}"
    torch = next(rest for word, rest in runtime if word == "ARG" and rest.startswith("TORCH_VERSION="))
    makefile = (REPO / "Makefile").read_text()
    assert f"CPU_TORCH ?= torch=={torch.split('=', 1)[1]}" in makefile  # the torch the tests run


def test_apt_layers_are_small():
    for stage in stages()[1]:
        for word, rest in stage["body"]:
            if word == "RUN" and "apt-get install" in rest:
                assert "--no-install-recommends" in rest and "rm -rf /var/lib/apt/lists/*" in rest, rest


def test_no_secrets_in_layers():
    for word, rest in instructions(DOCKERFILE.read_text()):
        if word in ("ENV", "ARG"):
            for name in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", rest):
                assert not SECRET_NAME.search(name), f"{word} {name}: a secret would stay in the image"
        if word in ("COPY", "ADD"):
            assert not rest.startswith(". "), "COPY . copies whatever lies in the context"
            assert not re.search(r"\.env|\.aws|id_rsa|tokens\.json", rest), rest
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", ".dockerignore must start by excluding everything"
    allowed = [line[1:] for line in ignore if line.startswith("!")]
    assert allowed == ["pyproject.toml", "README.md", "sdray/"]


def test_entrypoint_and_healthcheck():
    runtime = dict((word, rest) for word, rest in stages()[1][-1]["body"])
    assert json.loads(runtime["ENTRYPOINT"]) == ["sdray"]
    assert "http://127.0.0.1:8000/healthz" in runtime["HEALTHCHECK"]
    assert runtime["EXPOSE"] == "8000"
    service = (REPO / "helm" / "sdray" / "templates" / "service.yaml").read_text()
    assert '--port, "8000"' in service and "path: /healthz" in service  # the port and path the chart probes
