"""--help lists every registered model family and every flavor of each."""

from torchtitan.config.manager import ConfigManager
from torchtitan.models.registry import registered


def test_help_lists_every_family_and_every_flavor():
    lines = ConfigManager().format_help().splitlines()
    name_help = lines[lines.index(next(x for x in lines if x.startswith("  --model.name "))) + 1]
    flavor_help = lines[lines.index(next(x for x in lines if x.startswith("  --model.flavor "))) + 1]
    for family, spec in registered().items():
        assert family in name_help
        listed = flavor_help.split(f"{family}: ")[1].split(";")[0].rstrip(")").split(", ")
        assert listed == list(spec.flavors), (family, listed)
