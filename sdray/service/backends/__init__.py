"""Backends that run the service's jobs; ``make_backend`` picks one by name."""

from __future__ import annotations

from sdray.service.backends.base import Backend, BackendError, BackendStatus

__all__ = ["Backend", "BackendError", "BackendStatus", "make_backend", "BACKENDS"]

BACKENDS = ("local", "kuberay", "dry-run")


def make_backend(name: str, **options) -> Backend:
    """``local``: Ray jobs on a local or joined Ray cluster; ``kuberay``: DiffusionJobs for the controller;
    ``dry-run``: accept and finish jobs without running them."""
    if name == "local":
        from sdray.service.backends.local import LocalRayBackend

        return LocalRayBackend(address=options.get("ray_address"), data_dir=options["data_dir"],
                               num_cpus=options.get("num_cpus"))
    if name == "dry-run":
        from sdray.service.backends.dryrun import DryRunBackend

        return DryRunBackend()
    if name == "kuberay":
        from sdray.service.backends.kuberay import KubeRayBackend  # noqa: F401 - added with the k8s layer

        return KubeRayBackend(**{k: v for k, v in options.items() if k in ("namespace",)})
    raise BackendError(f"--backend: expected one of {', '.join(BACKENDS)}, got {name!r}")
