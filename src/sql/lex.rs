//! The little of PostgreSQL's lexical rules the classifier needs: where
//! words are, where parentheses and top-level semicolons are, and what to
//! skip (whitespace, `--` and nested `/* */` comments, '...' and E'...'
//! strings, "..." identifiers, $tag$...$tag$ bodies, numbers, operators).
//!
//! Written by hand rather than taken from a SQL crate: it runs on every
//! simple Query the relay forwards, and a tokenizer that allocates per token
//! (sqlparser's, say) cost more CPU than relaying the query did. This one
//! works on bytes and borrows every word from the text.

/// One token, borrowing from the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token<'a> {
    /// An unquoted identifier or keyword.
    Word(&'a [u8]),
    Open,
    Close,
    Semicolon,
    Dot,
    /// A '...' or E'...' literal: the bytes between the quotes, as written
    /// (a doubled quote or an escape is not resolved).
    Str(&'a [u8]),
    /// A "..." identifier: the bytes between the quotes, as written.
    Quoted(&'a [u8]),
    /// Anything else: a number, an operator, a parameter, a $$ body.
    Other,
}

pub struct Lexer<'a> {
    text: &'a [u8],
    pos: usize,
}

impl<'a> Lexer<'a> {
    pub fn new(text: &'a [u8]) -> Lexer<'a> {
        Lexer { text, pos: 0 }
    }

    fn at(&self, i: usize) -> u8 {
        self.text.get(i).copied().unwrap_or(0)
    }

    /// Skips whitespace and comments.
    fn skip_space(&mut self) {
        loop {
            match (self.at(self.pos), self.at(self.pos + 1)) {
                (c, _) if c.is_ascii_whitespace() => self.pos += 1,
                (b'-', b'-') => {
                    while self.pos < self.text.len() && self.text[self.pos] != b'\n' {
                        self.pos += 1;
                    }
                }
                (b'/', b'*') => self.skip_block_comment(),
                _ => return,
            }
        }
    }

    fn skip_block_comment(&mut self) {
        let mut depth = 0usize;
        while self.pos < self.text.len() {
            match (self.at(self.pos), self.at(self.pos + 1)) {
                (b'/', b'*') => {
                    depth += 1;
                    self.pos += 2;
                }
                (b'*', b'/') => {
                    depth -= 1;
                    self.pos += 2;
                    if depth == 0 {
                        return;
                    }
                }
                _ => self.pos += 1,
            }
        }
    }

    /// Skips a quoted run from its opening `quote`; `backslash`: E'' strings.
    fn skip_quoted(&mut self, quote: u8, backslash: bool) {
        self.pos += 1;
        while self.pos < self.text.len() {
            let c = self.text[self.pos];
            if backslash && c == b'\\' {
                self.pos += 2;
            } else if c == quote {
                self.pos += 1;
                if self.at(self.pos) != quote {
                    return;
                }
                self.pos += 1; // a doubled quote stands for itself
            } else {
                self.pos += 1;
            }
        }
    }

    /// A quoted run's inside, skipping past its closing quote.
    fn quoted(&mut self, quote: u8, backslash: bool) -> &'a [u8] {
        let start = self.pos + 1;
        self.skip_quoted(quote, backslash);
        let text: &'a [u8] = self.text;
        let end = if self.pos > start && self.at(self.pos - 1) == quote {
            self.pos - 1
        } else {
            self.pos.min(text.len())
        };
        &text[start.min(end)..end]
    }

    /// At `$`: a dollar-quoted body ($$...$$, $tag$...$tag$) is skipped and
    /// true returned; a parameter ($1) or a lone `$` is left alone.
    fn skip_dollar_quoted(&mut self) -> bool {
        let start = self.pos;
        let mut end = start + 1;
        while end < self.text.len()
            && is_word_byte(self.text[end])
            && !self.text[end].is_ascii_digit()
        {
            end += 1;
        }
        if self.at(end) != b'$' {
            return false;
        }
        let tag = &self.text[start..=end];
        let body = end + 1;
        self.pos = match self.text[body..].windows(tag.len()).position(|w| w == tag) {
            Some(i) => body + i + tag.len(),
            None => self.text.len(),
        };
        true
    }
}

fn is_word_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80
}

impl<'a> Iterator for Lexer<'a> {
    type Item = Token<'a>;

    fn next(&mut self) -> Option<Token<'a>> {
        self.skip_space();
        let c = *self.text.get(self.pos)?;
        let next = self.at(self.pos + 1);
        let token = match c {
            b'(' => Token::Open,
            b')' => Token::Close,
            b';' => Token::Semicolon,
            b'.' => Token::Dot,
            b'\'' => return Some(Token::Str(self.quoted(b'\'', false))),
            b'"' => return Some(Token::Quoted(self.quoted(b'"', false))),
            b'E' | b'e' if next == b'\'' => {
                self.pos += 1;
                return Some(Token::Str(self.quoted(b'\'', true)));
            }
            b'$' if self.skip_dollar_quoted() => return Some(Token::Other),
            c if is_word_byte(c) && !c.is_ascii_digit() => {
                let start = self.pos;
                while self.pos < self.text.len()
                    && (is_word_byte(self.text[self.pos]) || self.text[self.pos] == b'$')
                {
                    self.pos += 1;
                }
                return Some(Token::Word(&self.text[start..self.pos]));
            }
            _ => Token::Other,
        };
        self.pos += 1;
        Some(token)
    }
}

#[cfg(test)]
mod tests {
    use super::Token::*;
    use super::*;

    fn words(text: &str) -> Vec<String> {
        Lexer::new(text.as_bytes())
            .filter_map(|t| match t {
                Word(w) => Some(String::from_utf8_lossy(w).into_owned()),
                Semicolon => Some(";".into()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn skips_what_is_not_a_word_of_the_statement() {
        assert_eq!(
            words("SELECT 'a;b', \"c;d\", E'e\\';f', $$g;h$$, $t$i;$$j$t$ -- k;\n /* l; /* m; */ n; */ x"),
            ["SELECT", "x"]
        );
        assert_eq!(words("SELECT $1; UPDATE t"), ["SELECT", ";", "UPDATE", "t"]);
        assert_eq!(words("select 'it''s'; x"), ["select", ";", "x"]);
        assert_eq!(words("a$b e.f"), ["a$b", "e", "f"]);
    }

    #[test]
    fn unterminated_runs_end_at_the_end_of_the_text() {
        for text in ["SELECT 'a", "SELECT \"a", "SELECT $$a", "/* a", "E'\\"] {
            assert!(words(text).len() <= 1, "{text}");
        }
    }
}
