"""Run a module as __main__ with SQLAlchemy's warnings turned into errors: the worker, relay and
beat processes of the tests start through it (`python -m tests.strict celery -A worker worker …`),
so that a warning SQLAlchemy gives in a real process fails the test that caused it. (PYTHONWARNINGS
cannot name SQLAlchemy's warning class: it is read before site-packages are importable.)"""

import runpy
import sys
import warnings

from sqlalchemy.exc import SAWarning

warnings.simplefilter("error", SAWarning)
module = sys.argv[1]
sys.argv = [module, *sys.argv[2:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
