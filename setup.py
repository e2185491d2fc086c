from setuptools import find_packages, setup

from libra_worker import __version__

setup(
    name="libra_worker",
    version=__version__,
    description="Gearman worker that applies LBaaS jobs to the local HAProxy",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(exclude=["tests", "tests.*", "bench", "bench.*"]),
    package_data={"libra_worker.drivers.haproxy": ["templates/*.j2"]},
    include_package_data=True,
    install_requires=[
        "python-daemon>=2.3",
        "lockfile>=0.12",
        "jinja2>=3.0",
        "python-swiftclient>=3.10",
    ],
    extras_require={"test": ["pytest>=7", "hypothesis>=6", "gear>=0.15,<0.17"]},
    scripts=["bin/client.py"],
    entry_points={"console_scripts": ["libra_worker = libra_worker.main:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
        "Environment :: No Input/Output (Daemon)",
    ],
)
