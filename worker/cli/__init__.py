"""`invoice-worker`: the commands people run (CONTRACT.md section 9). Each module defines its own
click commands or group, and `main` attaches them; no module imports `main` back.

May import any package of the worker (it sits at the top, beside `local`); nothing imports it.
"""
