"""The memory planner's table for the README: per-device memory of the released sizes.

    python -m benchmarks.plan_table

For each model (224 px), mode and machine, the first mesh (most
data-parallel first) whose plan fits 90% of a device, as `auto_distribution`
chooses it: GiB per device and the mesh (data x model), or what the best
mesh would need. Batch 8 (inference: 64 prompt + 64 new tokens; training: 64
text tokens), bfloat16 weights, Adam for training, no remat.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

from keras_paligemma2 import distribution as dist  # noqa: E402

MACHINES = [
    ("v5e-1", 1, 16),
    ("v5e-4", 4, 16),
    ("v5e-8", 8, 16),
    ("v5e-16", 16, 16),
    ("v5e-32", 32, 16),
]
MACHINES += [(f"{n} x 80 GB GPU", n, 80) for n in (1, 2, 4, 8)]


def cell(model, mode, devices, gib):
    budget = 0.9 * gib * 2**30
    plans = [dist.plan(model, shape, mode, 8, 64) for shape in dist.meshes(devices, 8)]
    for p in plans:
        if p.total <= budget:
            return f"{p.total / 2**30:.1f} ({p.mesh_shape[0]}x{p.mesh_shape[1]})"
    best = min(plans, key=lambda p: p.total)
    return f"no: {best.total / 2**30:.0f} needed"


def main():
    models = ("pg2_3b_224", "pg2_10b_224", "pg2_28b_224")
    print(
        "| machine | "
        + " | ".join(f"{m[4:-4].upper()} {mode}" for m in models for mode in dist.MODES)
        + " |"
    )
    print("|---" * (1 + 3 * len(models)) + "|")
    for name, devices, gib in MACHINES:
        row = [cell(m, mode, devices, gib) for m in models for mode in dist.MODES]
        print(f"| {name} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
