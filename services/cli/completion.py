"""`loraplex completion bash|zsh`: a completion script generated from the argparse parser itself.

The script holds, for every command path ("", "adapters", "adapters list", ...), the words that
may follow it (subcommands, options, and the fixed choices of an option), so it never drifts from
the parser. zsh loads the same script through bashcompinit.
"""

from __future__ import annotations

import argparse

_CHOICES_SEP = "="


def command_words(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """Command path -> the subcommands and options completed after it."""
    words: dict[str, list[str]] = {}

    def walk(p: argparse.ArgumentParser, path: str) -> None:
        found: list[str] = []
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    found.append(name)
                    walk(child, f"{path} {name}".strip())
            elif action.option_strings:
                found.extend(o for o in action.option_strings if o.startswith("--"))
                # Enum options parse any case (format.enum_arg) and carry their names on the type.
                choices = action.choices
                if choices is None:
                    choices = getattr(action.type, "choices", None)
                if choices is not None:
                    words[f"{path}{_CHOICES_SEP}{action.option_strings[-1]}"] = [str(c) for c in choices]
            elif action.choices is not None:
                found.extend(str(c) for c in action.choices)
        words[path] = found

    walk(parser, "")
    return words


def bash_script(parser: argparse.ArgumentParser) -> str:
    prog = parser.prog
    fn = f"_{prog}_complete"
    cases = "\n".join(
        f'        "{path}") words="{" ".join(ws)}" ;;' for path, ws in sorted(command_words(parser).items())
    )
    return f"""# {prog} completion; load it with: eval "$({prog} completion bash)"
{fn}() {{
    local cur prev path word words i
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    path=""
    for ((i = 1; i < COMP_CWORD; i++)); do
        word="${{COMP_WORDS[i]}}"
        [[ "$word" == -* ]] && continue
        case "$(_{prog}_words "${{path:+$path }}$word")" in
            "") ;;
            *) path="${{path:+$path }}$word" ;;
        esac
    done
    words="$(_{prog}_words "$path{_CHOICES_SEP}$prev")"
    if [[ -z "$words" ]]; then
        words="$(_{prog}_words "$path")"
    fi
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}}
_{prog}_words() {{
    local words=""
    case "$1" in
{cases}
    esac
    printf '%s' "$words"
}}
complete -o default -F {fn} {prog}
"""


def zsh_script(parser: argparse.ArgumentParser) -> str:
    return (
        f'# {parser.prog} completion for zsh; load it with: eval "$({parser.prog} completion zsh)"\n'
        "autoload -U +X bashcompinit && bashcompinit\n" + bash_script(parser)
    )


def print_script(parser: argparse.ArgumentParser, shell: str) -> int:
    print(bash_script(parser) if shell == "bash" else zsh_script(parser))
    return 0
