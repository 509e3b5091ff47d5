"""Maps the design's top-level folders onto one import root, `qaas`.

`api/`, `worker/`, `kernels/` and `migrations/` are installed as `qaas.api`, `qaas.worker`,
`qaas.kernels` and `qaas.migrations`, so that no folder shadows a well-known distribution
(Hugging Face's `kernels` package, which transformers and bitsandbytes try to import).
Everything else about the package lives in pyproject.toml.
"""

from setuptools import find_packages, setup

PACKAGE_ROOTS = {
    "qaas": "qaas",
    "qaas.api": "api",
    "qaas.worker": "worker",
    "qaas.kernels": "kernels",
    "qaas.migrations": "migrations",
}

packages = []
for name, folder in PACKAGE_ROOTS.items():
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]

setup(
    packages=packages,
    package_dir=PACKAGE_ROOTS,
    package_data={name: ["*.html", "*.js", "*.css", "*.ini", "*.mako", "*.json", "*.txt", "**/*.txt", "**/*.html", "**/*.js", "**/*.css"] for name in PACKAGE_ROOTS},
    # package_data alone decides what ships: include_package_data would also scan the data folders
    # (dashboard templates and static files) and warn that they look like packages left out.
    include_package_data=False,
)
