"""carso: the CARSO adversarial defence (adversarial training + representation-conditional
purification + robust aggregation) as a command-line tool."""

__version__ = "0.1.0"
