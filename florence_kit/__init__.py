"""florence-kit: fine-tune and evaluate Florence-2 on new tasks.

The package reads like the path of one example, one subpackage per stage; later stages import earlier
ones only: common < metrics < tasks < data < model < evaluate < train < present < demo < cli.
(``metrics`` sits low because task files name metrics and are checked when read.)
"""

__version__ = "0.1.0"
