from collections import Counter

import pytest

from gdd_ray.plan import (
    WorkUnit,
    image_seed,
    is_class_unit_name,
    is_shard_name,
    parse_shard_name,
    parse_unit_key,
    plan_units,
    unit_of,
)


def test_units_cover_every_image_exactly_once_and_span_classes():
    units = plan_units(num_classes=7, ipc=23, unit_size=10)
    seen = Counter(image for u in units for image in u.images())
    assert len(seen) == 7 * 23 and set(seen.values()) == {1}
    assert len({u.shard_name for u in units}) == len(units)
    assert [u.size for u in units] == [10] * 16 + [1]  # full units but the run's last one
    assert units[0].images()[:8] == [(0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (5, 0), (6, 0), (0, 1)]  # index-major
    assert [u.round for u in units[:3]] == [0, 1, 2]
    for p in (0, 9, 10, 160):
        unit, row = unit_of(units, p)
        assert unit.start <= p < unit.stop and unit.images()[row] == (p % 7, p // 7)


def test_a_smaller_ipc_is_a_prefix_and_raising_it_keeps_every_full_unit():
    small, big = plan_units(3, 20, 10), plan_units(3, 40, 10)
    assert set(small) <= set(big)  # 60 images: six full units, nothing redone
    odd, more = plan_units(3, 7, 10), plan_units(3, 9, 10)
    assert set(odd[:-1]) <= set(more) and odd[-1] not in more  # only the old short last unit is redone
    assert [image for u in odd for image in u.images()] == [image for u in more for image in u.images()][:21]


def test_shard_names_round_trip():
    u = WorkUnit(120, 184, 100)
    assert u.shard_name == "u0000000120-0000000184.parquet"
    assert parse_shard_name(u.shard_name, 100) == u and parse_unit_key(u.key) == u
    assert is_shard_name(u.shard_name) and not is_class_unit_name(u.shard_name)
    for bad in ["x.parquet", "u1-2.parquet", "u0000000120-0000000184.parquet.tmp", "_summary.json",
                "u0000000184-0000000120.parquet"]:  # fmt: skip
        assert parse_shard_name(bad, 100) is None
    assert is_class_unit_name("c00012-i000040-000050.parquet")  # the layout before packed units
    assert parse_unit_key("1:2") is None and parse_unit_key("3:2:5") is None


def test_seeds_depend_on_run_class_index_only():
    assert image_seed(0, 3, 5) == image_seed(0, 3, 5)
    seeds = {image_seed(s, c, i) for s in range(2) for c in range(10) for i in range(50)}
    assert len(seeds) == 2 * 10 * 50
    assert all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize("classes, ipc", [(100, 1), (10, 10), (100, 20)], ids=["c100-ipc1", "c10-ipc10", "c100-ipc20"])
def test_packed_units_execute_at_most_one_partly_filled_batch(classes, ipc):
    """The issue's three settings at batch 16 (units of 64): the images the model executes are the images kept,
    plus what one padded last batch adds (one class per unit executed 1,600 for CIFAR-100 at IPC 1)."""
    batch = 16
    units = plan_units(classes, ipc, 64)
    executed = sum(-(-u.size // batch) * batch for u in units)  # what UnitGenerator.render executes
    kept = classes * ipc
    assert kept <= executed < kept + batch
    assert sum(u.size % batch != 0 for u in units) <= 1
