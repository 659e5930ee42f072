import random

import pytest

from lmslim.core.runtime import Runtime
from lmslim.data.spec import Data


@pytest.fixture
def rt():
    return Runtime.create(device="cpu")


@pytest.fixture
def docs():
    rng = random.Random(0)
    words = "the cat sat on a mat while dogs ran around the big green park near our house".split()
    return Data("docs", "clm", documents=[" ".join(rng.choice(words) for _ in range(rng.randint(3, 30)))
                                          for _ in range(24)])
