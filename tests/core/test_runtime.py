import platform
import subprocess
import sys

import pytest

from lmslim.core.runtime import Runtime

# Allocates and frees a 64 MB buffer, then counts the page faults of allocating and touching it again.
_PROBE = """
import resource, sys, torch
from lmslim.core.runtime import Runtime
if sys.argv[1] == "reuse":
    assert Runtime.create("cpu", threads=1).reuse_freed_host_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(16 * 2 ** 20); del x
before = faults()
y = torch.ones(16 * 2 ** 20)
print(faults() - before)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc mallopt")
def test_reused_host_memory_avoids_page_faults_on_reallocation():
    def run(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.strip().splitlines()[-1])

    default, reuse = run("release"), run("reuse")
    # 64 MB of fresh 4 KiB pages is ~16k faults (fewer with huge pages); a reused heap block needs almost none.
    assert default > 1000, default
    assert reuse < default / 10, (reuse, default)
