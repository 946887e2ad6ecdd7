"""The HDiT shell package imports, is discoverable, and claims no models."""

import importlib.metadata as md


def test_entry_point_registered_and_claims_nothing():
    import dtx_hdit
    from dtx_hdit import plugin

    assert dtx_hdit.IMPLEMENTED is False
    eps = [ep for ep in md.entry_points(group="dtx") if ep.value == "dtx_hdit.plugin"]
    assert len(eps) == 1
    assert not [n for n in dir(plugin) if n.startswith("dtx_register")]
