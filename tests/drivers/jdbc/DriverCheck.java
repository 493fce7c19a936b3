// pgJDBC through meridian: DDL, parameterised inserts and batches, a reused
// (server-side) prepared statement, commit, rollback, Connection.rollback()
// after an error, rollback(Savepoint) after an error, and continued use of
// the same connection. Arguments: a libpq URL (postgres://user@host:port/db),
// a table prefix, and extra JDBC URL properties (may be empty).
import java.net.URI;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Savepoint;
import java.sql.Statement;

public class DriverCheck {
    static void check(boolean ok, String what) {
        if (!ok) {
            throw new AssertionError(what);
        }
    }

    static long one(Connection c, String sql) throws SQLException {
        try (Statement st = c.createStatement(); ResultSet rs = st.executeQuery(sql)) {
            check(rs.next(), "a row from " + sql);
            return rs.getLong(1);
        }
    }

    static String sqlState(Connection c, String sql) {
        try (Statement st = c.createStatement()) {
            st.executeUpdate(sql);
        } catch (SQLException e) {
            return e.getSQLState();
        }
        throw new AssertionError("no error from " + sql);
    }

    public static void main(String[] args) throws Exception {
        URI u = new URI(args[0]);
        String p = args[1];
        String extra = args.length > 2 ? args[2] : "";
        String url = "jdbc:postgresql://" + u.getHost() + ":" + u.getPort() + u.getPath()
                + "?user=" + u.getUserInfo() + (extra.isEmpty() ? "" : "&" + extra);
        String items = p + "items", log = p + "log";
        try (Connection c = DriverManager.getConnection(url)) {
            System.out.println("connected: " + url);
            try (Statement st = c.createStatement()) {
                st.execute("CREATE TABLE " + items + " (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
                        + " name text NOT NULL UNIQUE, qty int NOT NULL DEFAULT 0)");
                st.execute("CREATE TABLE " + log + " (id bigserial PRIMARY KEY, note text NOT NULL)");
                st.execute("CREATE INDEX " + p + "items_qty_idx ON " + items + " (qty)");
            }
            System.out.println("DDL: created " + items + ", " + log + " and an index");

            // Parameterised inserts; the same PreparedStatement reused, then a batch.
            try (PreparedStatement ins = c.prepareStatement("INSERT INTO " + items + " (name, qty) VALUES (?, ?)")) {
                for (int i = 0; i < 10; i++) {
                    ins.setString(1, "item" + i);
                    ins.setInt(2, i);
                    check(ins.executeUpdate() == 1, "insert item" + i);
                }
                for (int i = 10; i < 15; i++) {
                    ins.setString(1, "item" + i);
                    ins.setInt(2, i);
                    ins.addBatch();
                }
                int[] counts = ins.executeBatch();
                check(counts.length == 5, "batch of 5");
            }
            check(one(c, "SELECT count(*) FROM " + items) == 15, "15 items");
            check(one(c, "SELECT count(*) FROM pg_prepared_statements") > 0,
                    "the reused statement was prepared server-side");
            System.out.println("inserted 15 rows with a reused prepared statement and a batch");

            // BEGIN ... COMMIT.
            c.setAutoCommit(false);
            try (Statement st = c.createStatement()) {
                st.executeUpdate("UPDATE " + items + " SET qty = qty + 100 WHERE name = 'item1'");
                st.executeUpdate("INSERT INTO " + log + " (note) VALUES ('committed')");
            }
            c.commit();
            // BEGIN ... ROLLBACK.
            try (Statement st = c.createStatement()) {
                st.executeUpdate("UPDATE " + items + " SET qty = -1");
            }
            c.rollback();
            check(one(c, "SELECT qty FROM " + items + " WHERE name = 'item1'") == 101, "commit kept, rollback undone");
            c.commit();
            System.out.println("commit and rollback");

            // An error inside a transaction, then Connection.rollback().
            try (Statement st = c.createStatement()) {
                st.executeUpdate("INSERT INTO " + log + " (note) VALUES ('rolled back')");
            }
            check("23505".equals(sqlState(c, "INSERT INTO " + items + " (name) VALUES ('item2')")), "unique violation");
            check("25P02".equals(sqlState(c, "INSERT INTO " + log + " (note) VALUES ('aborted')")),
                    "the transaction is aborted after the error");
            c.rollback();
            check(one(c, "SELECT count(*) FROM " + log + " WHERE note = 'rolled back'") == 0, "rolled back");
            c.commit();
            System.out.println("error in a transaction, Connection.rollback(), connection still usable");

            // An error after a savepoint, then rollback(Savepoint), and the transaction goes on.
            try (Statement st = c.createStatement()) {
                st.executeUpdate("INSERT INTO " + log + " (note) VALUES ('before savepoint')");
            }
            Savepoint sp = c.setSavepoint("jdbc_sp");
            check("23505".equals(sqlState(c, "INSERT INTO " + items + " (name) VALUES ('item3')")), "unique violation");
            c.rollback(sp);
            try (Statement st = c.createStatement()) {
                st.executeUpdate("INSERT INTO " + log + " (note) VALUES ('after savepoint')");
            }
            c.commit();
            check(one(c, "SELECT count(*) FROM " + log + " WHERE note IN ('before savepoint', 'after savepoint')") == 2,
                    "both sides of the savepoint committed");
            c.commit();
            System.out.println("error after a savepoint, rollback(Savepoint), commit");

            // Back to autocommit, more statements on the same connection.
            c.setAutoCommit(true);
            try (PreparedStatement upd = c.prepareStatement("UPDATE " + items + " SET qty = qty + ? WHERE name = ?")) {
                for (int i = 0; i < 6; i++) {
                    upd.setInt(1, 1);
                    upd.setString(2, "item" + i);
                    check(upd.executeUpdate() == 1, "update item" + i);
                }
            }
            try (PreparedStatement sel = c.prepareStatement("SELECT qty FROM " + items + " WHERE name = ?")) {
                for (int i = 0; i < 6; i++) {
                    sel.setString(1, "item" + i);
                    try (ResultSet rs = sel.executeQuery()) {
                        check(rs.next() && rs.getInt(1) == i + 1 + (i == 1 ? 100 : 0), "qty of item" + i);
                    }
                }
            }
            try (Statement st = c.createStatement()) {
                st.executeUpdate("INSERT INTO " + log + " (note) VALUES ('autocommit again')");
                st.executeUpdate("DELETE FROM " + items + " WHERE name = 'item14'");
            }
            check(one(c, "SELECT count(*) FROM " + items) == 14, "14 items");
            System.out.println("autocommit again: updates, selects, insert, delete");
        }
        System.out.println("jdbc ok");
    }
}
