"""Publishing merchandising rules: a content-addressed `rules` artifact in a new manifest.

A rules document (recsys_core.rules) is written as `<target>/rules/<version>/rules.json`, its normalised
form, with the usual meta.json. Publishing it makes a new manifest: the current manifest's artifacts, as
of the same day and with the same blend, plus the new rules. So rules get the manifest's guarantees
(validated, atomic swap, history, rollback with who and why, gc) and the server picks them up with the
manifest. The daily publish carries the current manifest's rules into the next one (`publish`'s
`carry`): a pipeline run never drops the rules in force. Both read the current manifest under the
target's lock, so a rules publish and a daily publish at the same moment both take effect, in either order.
"""

from __future__ import annotations

from pathlib import Path

from recsys_core.manifest import read_current, target_dir
from recsys_core.rules import RULES_FILE, RULES_KIND, RulesDocument
from recsys_dagster.publishing.protocol import PublishError, PublishOutcome, republish
from recsys_dagster.transform.artifact_dir import write_artifact_dir


def write_rules_artifact(artifact_root: Path, tenant: str, surface: str, document: RulesDocument) -> Path:
    """The rules artifact directory of `document` (written once: the same rules give the same version)."""
    target = target_dir(artifact_root, tenant, surface)
    meta = {"tenant": tenant, "surface": surface, "params": {"rules": len(document.rules)}}
    _, path = write_artifact_dir(target, RULES_KIND, meta, {RULES_FILE: document.normalised_json()})
    return path


def publish_rules(
    artifact_root: Path,
    tenant: str,
    surface: str,
    document: RulesDocument,
    *,
    reason: str,
    actor: str,
) -> PublishOutcome:
    """Publish `document` as the rules of a tenant and surface: the current manifest plus these rules.
    Raises `PublishError` when nothing is published there yet or the reason or actor is blank."""
    if not reason.strip() or not actor.strip():
        raise PublishError("publishing rules needs a reason and an actor (they are recorded in the registry)")
    # Refused before anything is written (nothing is ever unpublished, so a published target stays one);
    # the manifest the rules join is read again under the target's lock by `republish`.
    if read_current(artifact_root, tenant, surface) is None:
        raise PublishError(
            f"{tenant}/{surface}: nothing is published yet; run the pipeline first, rules apply to a "
            "published manifest"
        )
    folder = write_rules_artifact(artifact_root, tenant, surface, document)
    return republish(artifact_root, tenant, surface, {RULES_KIND: folder}, actor=actor, reason=reason)
