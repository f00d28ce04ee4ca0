"""Before the policy plans anything: is the reference acceptable here, and can it ever fit."""

from __future__ import annotations

from services.common.adapter_files import digest_hex
from services.common.object_store import AllowedSources
from services.worker.adapters.spec import AdapterSpec, AdapterTooLarge, BaseModelMismatch
from services.worker.tiers import AdapterSizes, Tier, TierPolicy

# The longest a request waits for room on the device before it is shed (its deadline may be sooner).
ADMIT_WAIT_S = 10.0


def check_reference(spec: AdapterSpec, sources: AllowedSources | None, base_model: str) -> None:
    """A malformed digest, a location outside the allow-list, another base model: refused before
    any I/O or accounting."""
    digest_hex(spec.digest)  # ValueError for a malformed digest
    if sources is not None:
        # Only the registry's store and allowed buckets: a reference naming anything else (another
        # bucket, a local file) is refused before anything is fetched or counted.
        sources.check(spec.uri, reader="worker")
    if spec.base_model and spec.base_model != base_model:
        raise BaseModelMismatch(
            f"adapter {spec.name} was trained for base model {spec.base_model!r}, "
            f"but this worker serves {base_model!r}; route it to a {spec.base_model} worker"
        )


def check_fits(policy: TierPolicy, spec: AdapterSpec, sizes: AdapterSizes, target: Tier) -> None:
    """An adapter larger than a whole tier it must pass through can never load: say so now,
    with the bytes that tier counts (its files on DISK, its engine layout on DEVICE and HOST)."""
    found = policy.tier_of(spec.digest)
    if found <= target:
        return
    needed = [target] + ([Tier.DISK] if found == Tier.OBJECT_STORE and target != Tier.DISK else [])
    for tier in needed:
        budget = policy.budgets.of(tier)
        size = sizes.bytes_in(tier)
        if size > budget:
            what = (
                f"is {size} bytes"
                if tier == Tier.DISK
                else f"occupies {size} bytes in the engine's layout (its slots, the rank padded to "
                f"its bucket, in the engine's dtype, and any edge LoRA)"
            )
            raise AdapterTooLarge(
                f"adapter {spec.name} {what}, more than this worker's whole {tier.name} "
                f"budget of {budget} bytes; raise LORAPLEX_{tier.name}_ADAPTER_BYTES or serve it "
                f"on another worker"
            )
