"""The shop task (ShopSimulator's setting): an agent serves a simulated shopper with a
hidden profile through tools, telling near-identical products apart.

:mod:`~.records` holds the shopper task and the catalogue IO; :mod:`~.shopper` the
shopper's answering rules and the tools' result texts; :mod:`~.demo_data` the synthetic
shop; :mod:`~.relabel` its families under fresh ids and names (the demo's copy lessons).
The simulator is ``livethinking.envs.shop.ShopEnvironment``, its expert agent
``livethinking.envs.shop_oracle``.
"""

from livethinking.tasks.shop.demo_data import ShopPaths, make_shop_catalogue, make_shop_data
from livethinking.tasks.shop.records import (ShopTask, load_catalogue, load_shop_tasks,
                                             write_catalogue, write_shop_tasks)
from livethinking.tasks.shop.shopper import (asked_attributes, format_comparison,
                                             format_results, parse_reply, shopper_reply)

__all__ = ["ShopPaths", "ShopTask", "asked_attributes", "format_comparison", "format_results",
           "load_catalogue", "load_shop_tasks", "make_shop_catalogue", "make_shop_data",
           "parse_reply", "shopper_reply",
           "write_catalogue", "write_shop_tasks"]
