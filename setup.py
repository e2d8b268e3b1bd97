"""kernelssl: fused kernels for kernel-based self-supervised losses (SSL-HSIC, SFRIK, MEC)."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "kernelssl" / "__init__.py").read_text()).group(1)

setup(
    name="kernelssl",
    version=VERSION,
    description="Kernel-based self-supervised losses (SSL-HSIC, SFRIK, MEC): NumPy references, "
    "PyTorch and fused Triton implementations",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # `reference/`, `tests/` and `benchmarks/` are run from a checkout, not installed.
    packages=find_packages(include=["kernelssl", "kernelssl.*"]),
    install_requires=[
        # The floors are what CI tests (.ci/run runs the suite on exactly these versions, the GPU
        # machine's image, as well as on the newest release).
        "torch>=2.11",
        "torchvision>=0.26",
        "numpy>=1.24",
        # the training script: digits data set, linear probe and k-NN, progress bar
        "scikit-learn>=1.3",
        "tqdm>=4.60",
        # torch's Linux x86_64 CUDA wheels already pull a matching triton; this states the tested floor.
        "triton>=3.6; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "hypothesis>=6.100",
            "scipy>=1.10",
            "ruff>=0.17,<0.18",  # .ci/run lints with it (ruff.toml); a minor release may add checks
            "matplotlib>=3.5",  # the plots of python -m kernelssl.bench (README's install gives them)
        ],
        # python -m kernelssl.bench alone (a user who needs no tests): its plots
        "bench": ["matplotlib>=3.5"],
    },
    entry_points={"console_scripts": ["kernelssl-train = kernelssl.train:main",
                                      "kernelssl-bench = kernelssl.bench.__main__:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
