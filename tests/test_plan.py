from collections import Counter

from gdd_ray.plan import WorkUnit, image_seed, parse_shard_name, plan_units


def test_units_cover_every_image_exactly_once():
    units = plan_units(num_classes=7, ipc=23, unit_size=10)
    seen = Counter((u.label, i) for u in units for i in range(u.start, u.stop))
    assert len(seen) == 7 * 23 and set(seen.values()) == {1}
    assert len({u.shard_name for u in units}) == len(units)


def test_raising_ipc_keeps_full_units():
    small = set(plan_units(3, 20, 10))
    assert small <= set(plan_units(3, 40, 10))


def test_shard_names_round_trip():
    u = WorkUnit(12, 40, 50)
    assert u.shard_name == "c00012-i000040-000050.parquet"
    assert parse_shard_name(u.shard_name) == u
    for bad in ["x.parquet", "c1-i2-3.parquet", "c00012-i000040-000050.parquet.tmp", "_summary.json"]:
        assert parse_shard_name(bad) is None


def test_seeds_depend_on_run_class_index_only():
    assert image_seed(0, 3, 5) == image_seed(0, 3, 5)
    seeds = {image_seed(s, c, i) for s in range(2) for c in range(10) for i in range(50)}
    assert len(seeds) == 2 * 10 * 50
    assert all(0 <= s < 2**63 for s in seeds)
