"""The house's rules, read from each module's imports (with ast: nothing is imported). The top
holds the recipe, its command line and its tests alone; the recipe imports only the standard
library, torch, torchvision, itself and the package `beyond`, whose helpers it calls by qualified
name; those helpers import nothing from the top; no module imports finetune.py; no imports run
in a circle."""
import ast
import os
import sys


from conftest import HERE

TOP = {"finetune.py", "data.py", "models.py", "train.py", "test_finetune.py", "conftest.py"}
RECIPE = {"data", "models", "train"}
TESTS = {"test_finetune", "conftest"}


def modules():
    """The project's modules by name, tests aside: the top's, and the package beyond's."""
    names = {name[:-3] for name in os.listdir(HERE) if name.endswith(".py")} - TESTS
    package = os.path.join(HERE, "beyond")
    names |= {"beyond"} | {f"beyond.{name[:-3]}" for name in os.listdir(package)
                           if name.endswith(".py") and name != "__init__.py"}
    return names


def source(module):
    parts = module.split(".") + (["__init__"] if module == "beyond" else [])
    with open(os.path.join(HERE, *parts) + ".py", encoding="utf-8") as f:
        return f.read()


def statements(module):
    """Each import statement of the module, at the top or inside a function."""
    return [node for node in ast.walk(ast.parse(source(module)))
            if isinstance(node, (ast.Import, ast.ImportFrom))]


def named(node, module):
    """The modules an import statement names: `from beyond import archs` names beyond and
    beyond.archs; `import beyond.archs` names both too (a package runs before its modules)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the module's own package
            package = module.split(".")[:len(module.split(".")) - node.level]
            base = ".".join(package + ([base] if base else []))
        names = [base] + [f"{base}.{alias.name}" for alias in node.names]
    found = set()
    for name in names:
        parts = name.split(".")
        found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return found


def imported(module, project):
    """The project's modules that the module imports."""
    return {name for node in statements(module) for name in named(node, module)} & project


def where(module, node):
    return f"{module}.py:{node.lineno}: {ast.unparse(node)}"


def test_the_top_holds_the_recipe_its_command_line_and_its_tests_alone():
    assert {name for name in os.listdir(HERE) if name.endswith(".py")} == TOP


def test_the_recipe_imports_the_standard_library_torch_and_beyond_by_qualified_name():
    """data, models and train import the standard library, torch, torchvision, each other, and
    the package beyond as `import beyond.x` (called as beyond.x.name, as the book calls d2l.name),
    never `from beyond.x import name`."""
    allowed = set(sys.stdlib_module_names) | {"torch", "torchvision"} | RECIPE
    wrong = []
    for module in sorted(RECIPE):
        for node in statements(module):
            if isinstance(node, ast.ImportFrom):
                ok = not node.level and node.module.split(".")[0] in allowed
            else:
                ok = all(alias.name.split(".")[0] in allowed
                         or (alias.name.split(".")[0] == "beyond" and alias.asname is None)
                         for alias in node.names)
            if not ok:
                wrong.append(where(module, node))
    assert wrong == []


def test_the_helpers_the_recipe_calls_import_nothing_from_the_top():
    """The package's modules that data, models and train import, and those they import in turn
    within the package, import none of data, models, train and finetune."""
    project = modules()
    helpers, todo = set(), [name for module in RECIPE for name in imported(module, project)
                            if name.split(".")[0] == "beyond"]
    while todo:
        module = todo.pop()
        if module not in helpers:
            helpers.add(module)
            todo += [name for name in imported(module, project) if name.split(".")[0] == "beyond"]
    assert helpers, "the recipe imports no helper: the rule would read nothing"
    top = RECIPE | {"finetune"}
    wrong = [where(module, node) for module in sorted(helpers) for node in statements(module)
             if named(node, module) & top]
    assert wrong == []


def test_no_module_imports_finetune():
    project = modules()
    wrong = [where(module, node) for module in sorted(project) for node in statements(module)
             if "finetune" in named(node, module)]
    assert wrong == []


def test_no_imports_run_in_a_circle():
    project = modules()
    graph = {module: imported(module, project) - {module} for module in project}
    done, path = set(), []

    def visit(module):
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        path.append(module)
        for name in sorted(graph[module]):
            circle = visit(name)
            if circle:
                return circle
        path.pop()
        done.add(module)
        return None
    circle = next((circle for module in sorted(project) if (circle := visit(module))), None)
    assert circle is None, " -> ".join(circle)


def python_files():
    """Every .py file of the project, tests included (not virtual environments, hidden folders,
    the data and the runs)."""
    for root, folders, names in os.walk(HERE):
        folders[:] = sorted(name for name in folders if not name.startswith((".", "__"))
                            and not os.path.exists(os.path.join(root, name, "pyvenv.cfg"))
                            and not (root == HERE and name in ("data", "runs")))
        yield from (os.path.join(root, name) for name in sorted(names) if name.endswith(".py"))


def test_every_line_is_at_most_100_characters():
    long = [f"{os.path.relpath(path, HERE)}:{n}" for path in python_files()
            for n, line in enumerate(open(path, encoding="utf-8"), 1)
            if len(line.rstrip("\n")) > 100]
    assert long == []
