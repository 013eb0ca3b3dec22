"""restoray: the command line, run configs, URI resolution and job submission over the restoration library."""

__version__ = "0.1.0"
# The packages this project ships (logging levels, py_modules of a submitted job): one list.
OUR_PACKAGES = ("restoray", "restoration", "pipelines", "training", "runtime", "serving")
