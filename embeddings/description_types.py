"""The one shape every description source returns, in a module that imports nothing of the
package, so that :mod:`embeddings.descriptions` and the sources it dispatches to (such as
:mod:`embeddings.llm`) can all name it without importing one another in a cycle.
"""

Descriptions = dict[str, list[str]]
"""``{class_name: [description, ...]}``."""
