// Long-lived pgjdbc connections driven step by step from standard input, for the failover tests
// (tests/harness/jdbc.py runs it): the test does something to the database between two steps and
// the same connections, with the statements pgjdbc prepared on the server before, go on.
//
//   java -cp /usr/share/java/postgresql.jar JdbcSessions.java HOST PORT DB USER PASSWORD TABLE CONNECTIONS
//
// Opens CONNECTIONS connections (server-prepared statements from their first use; the second
// connection in binary mode). Each input line "step N" runs N rounds on every connection, one
// after the other, of: SELECT ?::int + 1, then an INSERT of (connection, round) into TABLE, inside
// an explicit transaction every third round; it answers with one "ERROR ..." line per failed round
// (SQLSTATE first) and then "done inserted=I errors=E", I counting the inserts acknowledged so far.
// "quit" closes the connections and exits.

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;

public class JdbcSessions {
    public static void main(String[] args) throws Exception {
        String url = "jdbc:postgresql://" + args[0] + ":" + args[1] + "/" + args[2];
        String table = args[5];
        int count = Integer.parseInt(args[6]);
        List<Connection> conns = new ArrayList<>();
        for (int c = 0; c < count; c++) {
            Properties props = new Properties();
            props.setProperty("user", args[3]);
            props.setProperty("password", args[4]);
            props.setProperty("connectTimeout", "15");
            props.setProperty("socketTimeout", "60");
            props.setProperty("prepareThreshold", c == 1 ? "-1" : "1");
            conns.add(DriverManager.getConnection(url, props));
        }
        int[] round = new int[count];
        int inserted = 0;
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in));
        String line;
        while ((line = in.readLine()) != null && !line.equals("quit")) {
            int steps = Integer.parseInt(line.split(" ")[1]);
            int errors = 0;
            for (int c = 0; c < count; c++) {
                Connection conn = conns.get(c);
                for (int k = 0; k < steps; k++) {
                    int i = round[c]++;
                    boolean block = i % 3 == 0;
                    try {
                        conn.setAutoCommit(!block);
                        try (PreparedStatement ps = conn.prepareStatement("SELECT ?::int + 1")) {
                            ps.setInt(1, i);
                            try (ResultSet rs = ps.executeQuery()) {
                                rs.next();
                                if (rs.getInt(1) != i + 1) {
                                    throw new SQLException("got " + rs.getInt(1) + ", want " + (i + 1), "XXBAD");
                                }
                            }
                        }
                        try (PreparedStatement ps = conn.prepareStatement("INSERT INTO " + table + " (w, i) VALUES (?, ?)")) {
                            ps.setInt(1, c);
                            ps.setInt(2, i);
                            ps.executeUpdate();
                        }
                        if (block) {
                            conn.commit();
                        }
                        inserted++;
                    } catch (SQLException e) {
                        errors++;
                        System.out.println("ERROR " + e.getSQLState() + " connection " + c + " round " + i + ": " + e.getMessage());
                        if (block) {
                            try {
                                conn.rollback();
                            } catch (SQLException ignored) {
                                // the connection is broken: the next round says so
                            }
                        }
                    }
                }
            }
            System.out.println("done inserted=" + inserted + " errors=" + errors);
            System.out.flush();
        }
        for (Connection conn : conns) {
            conn.close();
        }
    }
}
