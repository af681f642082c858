import json

import pytest

from parity_tests.configs import TINY


@pytest.fixture
def tiny_json(tmp_path):
    """The tiny config as a JSON file, for a command line's --config."""
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY.to_dict()))
    return str(path)
