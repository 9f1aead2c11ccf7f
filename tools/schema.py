"""Print config/schema.yaml, generated from src/stepseg/settings.py (`make schema`).

Kept out of the package: the settings module imports the standard library only, and PyYAML is
needed only here (tests/test_settings.py checks that the committed schema is this output).
"""

import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from stepseg.settings import config_schema

print("# GENERATED from src/stepseg/settings.py, the one home of every setting, by")
print("# `make schema` (python tools/schema.py > config/schema.yaml): edit the settings,")
print("# then regenerate; tests/test_settings.py fails while this file differs.")
print(yaml.safe_dump(config_schema(), sort_keys=False, width=100, default_flow_style=None), end="")
