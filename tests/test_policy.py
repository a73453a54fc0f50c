import pytest

from pagellm.offload import Budget, NoOffload, OffloadPolicy, PinnedHotSet, parse_size

GiB = 2**30


def test_variants_budget_and_disabled():
    assert NoOffload().ram_budget_bytes() is None and NoOffload().is_disabled()
    assert Budget(100).ram_budget_bytes() == 100 and not Budget(100).is_disabled()
    p = PinnedHotSet(5 * GiB)
    assert p.ram_budget_bytes() == 5 * GiB and not p.is_disabled()
    assert (p.pin_embeddings, p.pin_output_head, p.pin_last_n_layers, p.prefetch_n_ahead) == (True, True, 0, 1)


def test_frozen():
    with pytest.raises(Exception):
        Budget(1).ram_bytes = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("none", NoOffload()),
        ("NONE", NoOffload()),
        ("budget:4GiB", Budget(4 * GiB)),
        ("budget:512mb", Budget(512 * 10**6)),
        ("budget:1.5GiB", Budget(int(1.5 * GiB))),
        ("budget:4096", Budget(4096)),
        ("budget:2kib", Budget(2048)),
        ("pinned:4GiB", PinnedHotSet(4 * GiB)),
        (
            "pinned:4GiB,embeddings=no,head=yes,last=4,prefetch=2",
            PinnedHotSet(4 * GiB, pin_embeddings=False, pin_output_head=True, pin_last_n_layers=4, prefetch_n_ahead=2),
        ),
        ("Pinned: 1GB , last=1", PinnedHotSet(10**9, pin_last_n_layers=1)),
    ],
)
def test_parse(text, expected):
    assert OffloadPolicy.parse(text) == expected


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("", "empty"),
        ("budget", "missing size"),
        ("budget:", "missing size"),
        ("budget:0", "greater than zero"),
        ("budget:-1GiB", "bad size"),
        ("budget:4XB", "bad size"),
        ("budget:4GiB,last=2", "only a size"),
        ("pinned:4GiB,color=red", "unknown key"),
        ("pinned:4GiB,last=-1", "whole number"),
        ("pinned:4GiB,last=two", "whole number"),
        ("pinned:4GiB,head=maybe", "yes or no"),
        ("pinned:4GiB,last", "key=value"),
        ("pinned:4GiB,prefetch=1000", "prefetch_n_ahead"),
        ("swap:4GiB", "unknown offload policy"),
        ("none:4GiB", "takes no arguments"),
    ],
)
def test_parse_errors(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        OffloadPolicy.parse(text)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Budget(0),
        lambda: Budget(-5),
        lambda: Budget(1.5),
        lambda: Budget(True),
        lambda: PinnedHotSet(10, pin_last_n_layers=-1),
        lambda: PinnedHotSet(10, prefetch_n_ahead=-1),
        lambda: PinnedHotSet(10, pin_embeddings="yes"),
    ],
)
def test_fields_validated_on_construction(make):
    with pytest.raises(ValueError):
        make()


def test_parse_size_units():
    assert parse_size("1KB") == 1000 and parse_size("1KiB") == 1024 and parse_size("3 GiB") == 3 * GiB
    assert str(OffloadPolicy.parse(str(PinnedHotSet(GiB, pin_last_n_layers=2)))) == str(PinnedHotSet(GiB, pin_last_n_layers=2))
