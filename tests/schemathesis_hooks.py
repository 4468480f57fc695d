"""schemathesis hooks for the API contract (``tests/schemathesis.toml``; ``SCHEMATHESIS_HOOKS=schemathesis_hooks``
with ``tests/`` on ``PYTHONPATH``): a check that holds the service's 422 answers to schema-valid documents to
the rules the DiffusionJob schema says it cannot express (``sdray.spec_rules.UNEXPRESSED``)."""

from __future__ import annotations

import schemathesis

from sdray.spec_rules import UNEXPRESSED


@schemathesis.check
def refusals_name_an_unexpressed_rule(ctx, response, case):
    """A document the schema allows may be refused (422) only for a rule the schema's description lists; any
    other refusal is a rule the schema should express (positive_data_acceptance lets 422 through for this)."""
    meta = case.meta
    if response.status_code != 422 or meta is None or not meta.generation.mode.is_positive:
        return None
    if "json" not in (case.media_type or ""):  # the YAML body's schema is its text, not the document
        return None
    lines = response.json().get("text") or []
    other = [line for line in lines if not any(rule.phrase in line for rule in UNEXPRESSED)]
    if other or not lines:
        raise AssertionError("a schema-valid document was refused by a rule the schema neither expresses nor "
                             "describes:\n" + "\n".join(other[:5] or [response.text[:500]]))
    return None
