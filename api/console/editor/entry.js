/*!
 * Hatchery console editor: a bundle of CodeMirror 6 for the web console,
 * built by scripts/build-console-editor.sh (exact versions in package-lock.json).
 *
 * It bundles these MIT-licensed packages, all
 * Copyright (C) 2016-2024 by Marijn Haverbeke <marijn@haverbeke.berlin> and others:
 * @codemirror/state, @codemirror/view, @codemirror/commands,
 * @codemirror/language, @codemirror/legacy-modes, @codemirror/autocomplete,
 * @codemirror/streamparser, @lezer/common, @lezer/highlight,
 * @marijn/find-cluster-break, style-mod, w3c-keyname.
 *
 * Permission is hereby granted, free of charge, to any person obtaining a copy
 * of this software and associated documentation files (the "Software"), to deal
 * in the Software without restriction, including without limitation the rights
 * to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
 * copies of the Software, and to permit persons to whom the Software is
 * furnished to do so, subject to the following conditions:
 *
 * The above copyright notice and this permission notice shall be included in
 * all copies or substantial portions of the Software.
 *
 * THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
 * IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
 * FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
 * AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
 * LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
 * OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN
 * THE SOFTWARE.
 */

// Entry point of the console editor bundle. The only global it defines is
// window.HatcheryEditor:
//
//   const ed = HatcheryEditor.create(parentElement, {
//     doc: "print(1)",          // initial text (optional, default "")
//     language: "python",       // "r" | "python" (optional, default "r")
//     onRun: () => { ... },     // called on Mod-Enter (Ctrl-Enter / Cmd-Enter)
//   });
//   ed.getCode(); ed.setCode("..."); ed.setLanguage("r"); ed.focus(); ed.view;

import { Compartment, EditorState, Prec } from "@codemirror/state";
import {
  EditorView,
  drawSelection,
  highlightActiveLine,
  highlightActiveLineGutter,
  keymap,
  lineNumbers,
} from "@codemirror/view";
import {
  defaultKeymap,
  history,
  historyKeymap,
  indentWithTab,
} from "@codemirror/commands";
import {
  StreamLanguage,
  bracketMatching,
  defaultHighlightStyle,
  indentOnInput,
  indentUnit,
  syntaxHighlighting,
} from "@codemirror/language";
import { closeBrackets, closeBracketsKeymap } from "@codemirror/autocomplete";
import { r } from "@codemirror/legacy-modes/mode/r";
import { python } from "@codemirror/legacy-modes/mode/python";

// One language instance per mode, shared by all editors on the page.
// Indentation follows each language's usual style (R: 2 spaces, Python: 4).
const LANGUAGES = {
  r: { language: StreamLanguage.define(r), unit: "  " },
  python: { language: StreamLanguage.define(python), unit: "    " },
};

function languageExtension(name) {
  const key = name === undefined || name === null ? "r" : String(name).toLowerCase();
  const entry = Object.prototype.hasOwnProperty.call(LANGUAGES, key) ? LANGUAGES[key] : null;
  if (!entry) {
    throw new TypeError(
      'HatcheryEditor: unsupported language "' + name + '" (expected "r" or "python")'
    );
  }
  return [entry.language, indentUnit.of(entry.unit)];
}

const lightTheme = EditorView.theme(
  {
    "&": {
      fontSize: "14px",
      backgroundColor: "#ffffff",
      color: "#1f2328",
      border: "1px solid #d0d7de",
      borderRadius: "4px",
      maxHeight: "60vh",
    },
    "&.cm-focused": {
      outline: "2px solid #0969da",
      outlineOffset: "-1px",
    },
    ".cm-scroller": {
      overflow: "auto",
      fontFamily:
        'ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace',
      lineHeight: "1.5",
    },
    ".cm-content, .cm-gutter": {
      minHeight: "12em",
    },
    ".cm-gutters": {
      backgroundColor: "#f6f8fa",
      color: "#6e7781",
      borderRight: "1px solid #d0d7de",
    },
    ".cm-activeLine": {
      backgroundColor: "#f0f6ff",
    },
    ".cm-activeLineGutter": {
      backgroundColor: "#e7effa",
    },
  },
  { dark: false }
);

function create(parent, options) {
  if (!parent || typeof parent.appendChild !== "function") {
    throw new TypeError("HatcheryEditor.create: parent must be a DOM element");
  }
  const opts = options || {};
  const doc = opts.doc === undefined || opts.doc === null ? "" : String(opts.doc);
  const language = new Compartment();

  const runKeymap = Prec.highest(
    keymap.of([
      {
        key: "Mod-Enter",
        preventDefault: true,
        run: () => {
          if (typeof opts.onRun === "function") opts.onRun();
          return true;
        },
      },
    ])
  );

  const state = EditorState.create({
    doc,
    extensions: [
      runKeymap,
      lineNumbers(),
      highlightActiveLineGutter(),
      history(),
      drawSelection(),
      indentOnInput(),
      bracketMatching(),
      closeBrackets(),
      highlightActiveLine(),
      syntaxHighlighting(defaultHighlightStyle, { fallback: true }),
      language.of(languageExtension(opts.language)),
      keymap.of([
        ...closeBracketsKeymap,
        ...defaultKeymap,
        ...historyKeymap,
        indentWithTab,
      ]),
      lightTheme,
    ],
  });

  const view = new EditorView({ state, parent });

  return {
    view,
    getCode() {
      return view.state.doc.toString();
    },
    setCode(text) {
      const insert = text === undefined || text === null ? "" : String(text);
      view.dispatch({
        changes: { from: 0, to: view.state.doc.length, insert },
        selection: { anchor: 0 },
        scrollIntoView: true,
      });
    },
    setLanguage(name) {
      view.dispatch({ effects: language.reconfigure(languageExtension(name)) });
    },
    focus() {
      view.focus();
    },
  };
}

window.HatcheryEditor = Object.freeze({ create });
