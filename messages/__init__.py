"""The message bodies of the contract (CONTRACT.md section 3) as pydantic schemas, and the field
types they are made of: strict where money and ids are concerned.

May import `models` only (money rules, the invoice address): delivery, storage and tasks read it.
"""
