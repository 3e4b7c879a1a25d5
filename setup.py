"""fasttrain: fast training and honest measurement of uniformly thin ResNets."""
from setuptools import find_packages, setup

setup(
    name="fasttrain",
    version="0.1.0",
    description="Train and measure ThinResNets (arXiv 2309.12854) fast",
    packages=find_packages(include=["fasttrain", "fasttrain.*"]),
    python_requires=">=3.11",
    install_requires=[
        "torch>=2.11",
        "torchvision>=0.26",
        "fvcore",
        "rich",
        "PyYAML",
        "matplotlib",
        "scikit-learn",
    ],
    extras_require={"test": ["pytest", "pytest-timeout"]},
)
